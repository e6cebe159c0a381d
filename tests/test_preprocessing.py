"""Preprocessing descriptions: real MONAI transforms, real NIfTI files, a real SQLite store.

The promise under test: a chain written down with ``describe`` and built again with
``rebuild`` (or ``load`` from a run) does exactly what the original did, and anything that
cannot be written down is refused by name rather than dropped.
"""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from monai.data import NibabelReader
from monai.transforms import MapTransform, Transform

from mlpipe.core.errors import NotFoundError, PreprocessingError
from mlpipe.data import preprocessing as prep

pytestmark = pytest.mark.filterwarnings(
    # MONAI announces a new default for Orientationd(labels=...); the description records it.
    "ignore:.*Orientationd.__init__.labels.*:FutureWarning"
)

KEYS = ("image", "label")


# --- fixtures and helpers -------------------------------------------------------------------


def ct_chain(*, a_max: float = 164, load: bool = True) -> mt.Compose:
    """A realistic CT segmentation training chain, as in MONAI's spleen tutorial."""
    steps = [
        mt.EnsureChannelFirstd(keys=KEYS),
        mt.Orientationd(keys=KEYS, axcodes="RAS"),
        mt.Spacingd(keys=KEYS, pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest")),
        mt.ScaleIntensityRanged(keys="image", a_min=-57, a_max=a_max, b_min=0, b_max=1, clip=True),
        mt.CropForegroundd(keys=KEYS, source_key="image"),
        mt.RandCropByPosNegLabeld(
            keys=KEYS,
            label_key="label",
            spatial_size=(8, 8, 8),
            pos=2,
            neg=1,
            num_samples=2,
            image_key="image",
            image_threshold=0,
        ),
        mt.RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        mt.RandRotate90d(keys=KEYS, prob=0.5, max_k=3),
        mt.RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        mt.EnsureTyped(keys=KEYS),
    ]
    if load:
        steps.insert(0, mt.LoadImaged(keys=KEYS))
    return mt.Compose(steps)


def deterministic_chain() -> mt.Compose:
    return mt.Compose(ct_chain().transforms[:6] + ct_chain().transforms[-1:])


@pytest.fixture
def ct_case(tmp_path) -> dict[str, str]:
    """A small CT volume in Hounsfield units and its label, as NIfTI files with a LPS affine."""
    rng = np.random.default_rng(0)
    shape = (40, 36, 16)
    image = np.full(shape, -1000.0, dtype=np.float32)  # air
    image[4:36, 4:32, 2:14] = 40.0 + rng.normal(0, 10, (32, 28, 12))  # soft tissue
    label = np.zeros(shape, dtype=np.uint8)
    label[12:24, 10:22, 5:10] = 1
    image[label == 1] += 60.0  # a brighter organ
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    paths = {"image": tmp_path / "ct.nii.gz", "label": tmp_path / "ct_label.nii.gz"}
    nib.save(nib.Nifti1Image(image, affine), paths["image"])
    nib.save(nib.Nifti1Image(label, affine), paths["label"])
    return {key: str(path) for key, path in paths.items()}


@pytest.fixture
def tracking(tmp_path):
    """The fluent MLflow API pointed at a fresh SQLite store; reset afterwards."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def log_descriptions(**descriptions: dict) -> str:
    import mlflow

    with mlflow.start_run() as run:
        for name, description in descriptions.items():
            mlflow.log_text(prep.to_json(description), f"mlpipe/preprocessing/{name}.json")
    return run.info.run_id


def outputs(chain: mt.Compose, data: dict, seed: int | None = None) -> list[dict]:
    if seed is not None:
        chain.set_random_state(seed=seed)
    result = chain(dict(data))
    return result if isinstance(result, list) else [result]


def assert_same_outputs(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for one, other in zip(first, second, strict=True):
        assert sorted(one) == sorted(other)
        for key in KEYS:
            assert one[key].shape == other[key].shape, key
            assert torch.equal(torch.as_tensor(one[key]), torch.as_tensor(other[key])), key
            assert torch.equal(one[key].affine, other[key].affine), key


def args_of(description: dict, index: int) -> dict:
    return description["transforms"][index]["args"]


# Importable custom transforms (module level, so ``test_preprocessing.X`` imports them).


class ShiftIntensityd(MapTransform):
    """A custom transform written the MONAI way: every argument kept under its own name."""

    def __init__(self, keys, offset: float, clip_min: float | None = None) -> None:
        super().__init__(keys)
        self.offset = offset
        self._clip_min = clip_min

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key] + self.offset
            if self._clip_min is not None:
                d[key] = d[key].clip(min=self._clip_min)
        return d


class LogScale(Transform):
    """Keeps only a value derived from its argument, so ``factor`` is found nowhere."""

    def __init__(self, factor: float = 1.0) -> None:
        self.log_factor = math.log(factor)

    def __call__(self, img):
        return img * math.exp(self.log_factor)


class Seeded(Transform):
    """Needs an argument it does not keep."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, img):
        return img


def identity(img):
    return img


# --- describe -------------------------------------------------------------------------------


def test_describe_records_import_paths_and_constructor_args():
    description = prep.describe(ct_chain())

    assert description["format"] == prep.FORMAT == "mlpipe.preprocessing/1"
    targets = [item["target"] for item in description["transforms"]]
    assert targets == [
        "monai.transforms.LoadImaged",
        "monai.transforms.EnsureChannelFirstd",
        "monai.transforms.Orientationd",
        "monai.transforms.Spacingd",
        "monai.transforms.ScaleIntensityRanged",
        "monai.transforms.CropForegroundd",
        "monai.transforms.RandCropByPosNegLabeld",
        "monai.transforms.RandFlipd",
        "monai.transforms.RandRotate90d",
        "monai.transforms.RandScaleIntensityd",
        "monai.transforms.EnsureTyped",
    ]
    assert args_of(description, 2)["axcodes"] == "RAS"
    spacing = args_of(description, 3)
    assert spacing["pixdim"] == {"__ndarray__": [1.5, 1.5, 2.0], "dtype": "float64"}
    assert spacing["mode"] == ["bilinear", "nearest"]
    scale = args_of(description, 4)
    assert {k: scale[k] for k in ("a_min", "a_max", "b_min", "b_max", "clip")} == {
        "a_min": -57,
        "a_max": 164,
        "b_min": 0,
        "b_max": 1,
        "clip": True,
    }
    assert scale["dtype"] == {"__dtype__": "numpy.float32"}
    assert scale["keys"] == ["image"]
    assert args_of(description, 5)["select_fn"] == {"__object__": "monai.transforms.is_positive"}
    crop = args_of(description, 6)
    # MONAI keeps only pos / (pos + neg); the recovered pair gives the same ratio.
    assert (crop["pos"], crop["neg"], crop["num_samples"]) == (2.0, 1.0, 2)
    assert crop["spatial_size"] == [8, 8, 8]
    assert args_of(description, 7)["prob"] == 0.5
    assert args_of(description, 8)["max_k"] == 3
    assert args_of(description, 9)["factors"] == [-0.1, 0.1]
    assert description["compose"]["map_items"] is True


def test_describe_round_trips_through_rebuild():
    description = prep.describe(ct_chain())

    rebuilt = prep.rebuild(description)

    assert isinstance(rebuilt, mt.Compose)
    assert [type(t) for t in rebuilt.transforms] == [type(t) for t in ct_chain().transforms]
    assert prep.describe(rebuilt) == description
    assert prep.to_json(prep.describe(rebuilt)) == prep.to_json(description)


def test_rebuild_applies_the_same_preprocessing_to_a_nifti_volume(ct_case):
    original = ct_chain()
    rebuilt = prep.rebuild(prep.describe(original))

    # Random transforms: same seed, same crops, flips and scaling.
    assert_same_outputs(outputs(original, ct_case, seed=7), outputs(rebuilt, ct_case, seed=7))
    # Deterministic part alone, no seeding involved.
    fixed = deterministic_chain()
    assert_same_outputs(
        outputs(fixed, ct_case), outputs(prep.rebuild(prep.describe(fixed)), ct_case)
    )
    # The comparison is not vacuous: one argument changed gives another volume.
    steps = list(fixed.transforms)
    steps[4] = mt.ScaleIntensityRanged("image", a_min=-57, a_max=300, b_min=0, b_max=1, clip=True)
    other = prep.rebuild(prep.describe(steps))
    with pytest.raises(AssertionError):
        assert_same_outputs(outputs(fixed, ct_case), outputs(other, ct_case))


def test_describe_list_equals_compose():
    chain = ct_chain()

    assert prep.describe(list(chain.transforms)) == prep.describe(chain)
    assert prep.describe(tuple(chain.transforms)) == prep.describe(chain)


def test_describe_records_compose_settings():
    chain = mt.Compose([mt.ScaleIntensityd(keys="image")], map_items=False, unpack_items=True)

    description = prep.describe(chain)

    assert description["compose"]["map_items"] is False
    assert description["compose"]["unpack_items"] is True
    rebuilt = prep.rebuild(description)
    assert (rebuilt.map_items, rebuilt.unpack_items) == (False, True)


def test_describe_is_unchanged_after_the_chain_was_applied(ct_case):
    chain = ct_chain()
    before = prep.describe(chain)

    for seed in range(3):  # random transforms keep their last draw on the instance
        outputs(chain, ct_case, seed=seed)

    assert prep.describe(chain) == before


def test_describe_refuses_lambda_naming_index_class_and_parameter():
    chain = mt.Compose(
        [mt.ScaleIntensityd(keys="image"), mt.Lambdad(keys="image", func=lambda x: x)]
    )

    with pytest.raises(
        PreprocessingError, match=r"transform 1 \(Lambdad\): parameter 'func'"
    ) as err:
        prep.describe(chain)
    assert "lambda" in str(err.value)


def test_describe_accepts_importable_functions():
    description = prep.describe([mt.Lambdad(keys="image", func=np.abs)])

    assert args_of(description, 0)["func"] == [{"__object__": "numpy.absolute"}]
    rebuilt = prep.rebuild(description)
    result = rebuilt({"image": np.array([-2.0, 3.0])})
    assert result["image"].tolist() == [2.0, 3.0]


def test_describe_round_trips_importable_custom_transform():
    chain = [ShiftIntensityd(keys="image", offset=2.5, clip_min=0.0)]

    description = prep.describe(chain)

    assert description["transforms"][0] == {
        "target": "test_preprocessing.ShiftIntensityd",
        "args": {"keys": ["image"], "offset": 2.5, "clip_min": 0.0},
    }
    result = prep.rebuild(description)({"image": np.array([-5.0, 1.0])})
    assert result["image"].tolist() == [0.0, 3.5]


def test_describe_refuses_custom_class_that_hides_an_argument():
    with pytest.raises(PreprocessingError, match=r"transform 0 \(LogScale\)") as err:
        prep.describe([LogScale(factor=2.0)])
    message = str(err.value)
    assert "log_factor" in message  # where the rebuilt one differs
    assert "taken as their defaults: factor" in message  # which argument was not found


def test_describe_keeps_default_that_rebuilds_the_same_state():
    # Not found on the instance, but the default gives the very same object: verified, kept.
    description = prep.describe([LogScale()])

    assert args_of(description, 0) == {"factor": 1.0}


def test_describe_refuses_required_argument_not_kept():
    with pytest.raises(PreprocessingError, match=r"transform 0 \(Seeded\): parameter 'seed'"):
        prep.describe([Seeded(seed=3)])


def test_describe_refuses_class_defined_in_a_function():
    class Local(Transform):
        def __init__(self, gain: float = 1.0) -> None:
            self.gain = gain

        def __call__(self, img):
            return img * self.gain

    with pytest.raises(PreprocessingError, match=r"transform 0 \(Local\).*inside a function"):
        prep.describe([mt.ScaleIntensityd(keys="image"), Local(2.0)][1:])


def test_describe_refuses_plain_function_in_the_chain():
    with pytest.raises(PreprocessingError, match=r"transform 1 \(function\).*not a transform"):
        prep.describe(mt.Compose([mt.ScaleIntensityd(keys="image"), identity]))


@pytest.mark.parametrize("value", ["LoadImaged", 3, None])
def test_describe_refuses_what_is_not_a_chain(value):
    with pytest.raises(PreprocessingError, match="Cannot describe"):
        prep.describe(value)


def test_describe_accepts_plain_dict_and_fills_in_defaults():
    plain = {
        "transforms": [
            {
                "target": "monai.transforms.ScaleIntensityRanged",
                "args": {"keys": "image", "a_min": -57, "a_max": 164},
            }
        ]
    }

    description = prep.describe(plain)

    assert description == prep.describe([mt.ScaleIntensityRanged("image", -57, 164)])
    assert args_of(description, 0)["clip"] is False
    assert args_of(description, 0)["b_min"] is None


@pytest.mark.parametrize(
    ("plain", "message"),
    [
        ({"lr": 0.1, "a_min": -57}, r"Unknown keys \['a_min', 'lr'\]"),
        ({"transforms": "ScaleIntensityd"}, r'"transforms" must be a list'),
        ({"transforms": [{"target": "monai.transforms.X", "kwargs": {}}]}, "wrong shape"),
    ],
)
def test_describe_refuses_dict_of_another_shape(plain, message):
    with pytest.raises(PreprocessingError, match=message):
        prep.describe(plain)


def test_describe_records_dtypes_and_rebuild_restores_them():
    chain = [
        mt.CastToTyped(keys=KEYS, dtype=(np.float32, np.uint8)),
        mt.EnsureTyped(keys=KEYS, dtype=torch.float16, track_meta=False),
    ]

    description = prep.describe(chain)

    assert args_of(description, 0)["dtype"] == [
        {"__dtype__": "numpy.float32"},
        {"__dtype__": "numpy.uint8"},
    ]
    assert args_of(description, 1)["dtype"] == [{"__dtype__": "torch.float16"}] * 2
    result = prep.rebuild(description)({"image": np.ones(3), "label": np.ones(3)})
    assert result["image"].dtype == torch.float16
    assert type(result["image"]) is torch.Tensor  # track_meta=False came back too


def test_describe_records_non_finite_floats_as_markers():
    description = prep.describe([mt.ThresholdIntensityd(keys="image", threshold=float("inf"))])

    assert args_of(description, 0)["threshold"] == {"__float__": "inf"}
    assert "Infinity" not in prep.to_json(description)  # stays valid JSON
    assert prep.rebuild(description).transforms[0].filter.threshold == math.inf


def test_describe_records_a_reader_instance(ct_case):
    chain = mt.Compose([mt.LoadImaged(keys=KEYS, reader=NibabelReader(as_closest_canonical=True))])

    description = prep.describe(chain)

    reader = args_of(description, 0)["reader"]["__instance__"]
    assert reader["target"] == "monai.data.NibabelReader"
    assert reader["args"]["as_closest_canonical"] is True
    assert_same_outputs(outputs(chain, ct_case), outputs(prep.rebuild(description), ct_case))


def test_describe_records_nested_transforms_of_one_of():
    chain = [
        mt.OneOf(
            [mt.RandFlipd(keys=KEYS, prob=1.0), mt.RandRotate90d(keys=KEYS, prob=1.0)],
            weights=[0.25, 0.75],
        )
    ]

    description = prep.describe(chain)

    args = args_of(description, 0)
    assert args["weights"] == [0.25, 0.75]
    assert [t["__instance__"]["target"] for t in args["transforms"]] == [
        "monai.transforms.RandFlipd",
        "monai.transforms.RandRotate90d",
    ]
    assert prep.describe(prep.rebuild(description)) == description


# --- to_json, digest ------------------------------------------------------------------------


def test_to_json_is_canonical():
    description = prep.describe(ct_chain())
    reordered = json.loads(json.dumps(description, sort_keys=False))
    reordered = {key: reordered[key] for key in reversed(list(reordered))}

    text = prep.to_json(description)

    assert text == prep.to_json(reordered)
    assert text == json.dumps(description, sort_keys=True, separators=(",", ":"))
    assert "\n" not in text and ": " not in text
    assert json.loads(text) == description


def test_to_json_refuses_values_json_cannot_hold():
    with pytest.raises(PreprocessingError, match="not plain JSON"):
        prep.to_json({"transforms": [{"target": "x.Y", "args": {"a": float("nan")}}]})


def test_digest_is_stable_and_changes_with_one_argument():
    first = prep.digest(prep.describe(ct_chain()))

    assert first == prep.digest(prep.describe(ct_chain()))  # fresh objects, same digest
    assert len(first) == 64 and int(first, 16) >= 0
    assert prep.digest(prep.describe(ct_chain(a_max=165))) != first


# --- flat_params ----------------------------------------------------------------------------


def test_flat_params_names_each_argument():
    params = prep.flat_params(prep.describe(ct_chain()), "train")

    assert params["prep.train.4.ScaleIntensityRanged.a_min"] == "-57"
    assert params["prep.train.4.ScaleIntensityRanged.clip"] == "true"
    assert params["prep.train.4.ScaleIntensityRanged.dtype"] == "numpy.float32"
    assert params["prep.train.3.Spacingd.pixdim"] == "[1.5,1.5,2.0]"
    assert params["prep.train.2.Orientationd.axcodes"] == "RAS"
    assert params["prep.train.5.CropForegroundd.select_fn"] == "monai.transforms.is_positive"
    assert params["prep.train.compose.map_items"] == "true"
    assert all(key.startswith("prep.train.") for key in params)
    assert all(len(k) <= 250 and len(v) <= 6000 for k, v in params.items())


def test_flat_params_are_accepted_by_mlflow(tracking):
    from mlflow import MlflowClient
    from mlflow.entities import Param

    params = prep.flat_params(prep.describe(ct_chain()), "train")
    client = MlflowClient(tracking_uri=tracking)
    run_id = client.create_run("0").info.run_id
    items = sorted(params.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])

    assert client.get_run(run_id).data.params == params


def test_flat_params_shortens_long_keys_and_truncates_long_values():
    long_arg = "a" * 300
    description = {
        "transforms": [
            {
                "target": "pkg.Wide",
                "args": {long_arg: 1, long_arg + "b": 2, "values": list(range(3000))},
            }
        ]
    }

    params = prep.flat_params(description, "train")

    keys = [key for key in params if key.startswith("prep.train.0.Wide.aaa")]
    assert len(keys) == 2  # both kept, told apart by their hash
    assert all(len(key) == 250 and key[-9] == "~" for key in keys)
    assert prep.flat_params(description, "train") == params  # deterministic
    value = params["prep.train.0.Wide.values"]
    assert len(value) == 6000
    assert value.endswith(prep.TRUNCATED)
    assert value.startswith("[0,1,2,")


@pytest.mark.parametrize("name", ["", "a/b", "../x", ".hidden", "tr ain", "x" * 101])
def test_flat_params_refuses_bad_name(name):
    with pytest.raises(PreprocessingError, match="Preprocessing name"):
        prep.flat_params(prep.describe([mt.ScaleIntensityd(keys="image")]), name)


# --- rebuild --------------------------------------------------------------------------------


def test_rebuild_refuses_another_format():
    description = prep.describe([mt.ScaleIntensityd(keys="image")])
    description["format"] = "mlpipe.preprocessing/2"

    with pytest.raises(PreprocessingError, match=r"format 'mlpipe.preprocessing/2'"):
        prep.rebuild(description)


def test_rebuild_names_a_target_that_does_not_import():
    description = {"transforms": [{"target": "monai.transforms.NoSuchTransformd", "args": {}}]}

    with pytest.raises(PreprocessingError, match=r"transform 0 \(NoSuchTransformd\)"):
        prep.rebuild(description)


def test_rebuild_names_an_argument_the_constructor_refuses():
    description = prep.describe([mt.ScaleIntensityd(keys="image")])
    description["transforms"][0]["args"]["renamed_in_monai_2"] = 1

    with pytest.raises(PreprocessingError, match=r"transform 0 \(ScaleIntensityd\).*renamed_in"):
        prep.rebuild(description)


# --- load -----------------------------------------------------------------------------------


def test_load_round_trips_through_a_tracking_store(tracking, ct_case):
    description = prep.describe(ct_chain())
    run_id = log_descriptions(train=description)

    loaded = prep.load(run_id)

    assert prep.describe(loaded) == description
    assert_same_outputs(outputs(ct_chain(), ct_case, seed=3), outputs(loaded, ct_case, seed=3))


def test_load_by_name_with_explicit_tracking_uri(tracking):
    import mlflow

    train = prep.describe(ct_chain())
    val = prep.describe(deterministic_chain())
    run_id = log_descriptions(train=train, val=val)
    mlflow.set_tracking_uri(None)

    assert prep.describe(prep.load(run_id, "val", tracking_uri=tracking)) == val


def test_load_defaults_to_mlpipe_settings(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns.db")  # ./mlruns.db
    run_id = client.create_run("0").info.run_id
    description = prep.describe([mt.ScaleIntensityd(keys="image")])
    client.log_text(run_id, prep.to_json(description), prep.artifact_path("train"))

    assert prep.describe(prep.load(run_id)) == description


def test_load_names_run_and_lists_logged_names(tracking):
    run_id = log_descriptions(val=prep.describe([mt.ScaleIntensityd(keys="image")]))

    with pytest.raises(PreprocessingError) as err:
        prep.load(run_id, "train")

    message = str(err.value)
    assert run_id in message
    assert "'train'" in message
    assert "preprocessing logged with this run: val." in message


def test_load_says_when_a_run_has_no_preprocessing(tracking):
    run_id = log_descriptions()

    with pytest.raises(PreprocessingError, match="preprocessing logged with this run: none"):
        prep.load(run_id)


def test_load_unknown_run_is_not_found(tracking):
    log_descriptions()  # the store exists

    with pytest.raises(NotFoundError, match="run 0123456789abcdef"):
        prep.load("0123456789abcdef")
