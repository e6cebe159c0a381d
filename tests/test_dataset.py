"""Unit tests of mlpipe.dataset: layouts, the content digest, the hash cache and the checks.

Every test writes real NIfTI files with nibabel (8x8x8, so the module runs in about a second).
Files get an mtime a day in the past, as a dataset on disk has: files modified in the last two
seconds are deliberately not cached (see the module docstring), which would hide cache hits.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import mlpipe.data.dataset as dataset_module
from mlpipe.core.errors import DatasetError
from mlpipe.data.dataset import DatasetInfo, build_manifest, digest_of
from mlpipe.data.hash_cache import CACHE_ENV, default_cache_path

DAY_AGO_NS = time.time_ns() - 86_400 * 10**9
HOUR_AGO_NS = time.time_ns() - 3_600 * 10**9


@pytest.fixture(autouse=True)
def cache_dir(clean_env, monkeypatch, tmp_path) -> Path:
    """The default cache goes to the test's folder, never to the developer's ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def examined(monkeypatch) -> list[Path]:
    """Records every file that is actually read (hashed), i.e. every cache miss."""
    calls: list[Path] = []
    original = dataset_module._examine
    lock = threading.Lock()

    def counting(path: Path):
        with lock:
            calls.append(path)
        return original(path)

    monkeypatch.setattr(dataset_module, "_examine", counting)
    return calls


def _nifti(
    path: Path, shape=(8, 8, 8), *, seed: int = 0, dtype=np.float32, label: bool = False
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 3, shape).astype(np.uint8) if label else rng.random(shape).astype(dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    _age(path)
    return path


def _age(path: Path, mtime_ns: int = DAY_AGO_NS) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def _decathlon(
    root: Path,
    cases=("spleen_1", "spleen_2"),
    *,
    test_cases=(),
    meta: dict | None = None,
    ext: str = ".nii.gz",
) -> Path:
    for number, case in enumerate(cases):
        _nifti(root / "imagesTr" / f"{case}{ext}", seed=number)
        _nifti(root / "labelsTr" / f"{case}{ext}", seed=number, label=True)
    for number, case in enumerate(test_cases, start=100):
        _nifti(root / "imagesTs" / f"{case}{ext}", seed=number)
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _plain(root: Path, cases=("a", "b"), *, ext: str = ".nii.gz") -> Path:
    for number, case in enumerate(cases):
        _nifti(root / f"{case}_image{ext}", seed=number)
        _nifti(root / f"{case}_label{ext}", seed=number, label=True)
    return root


def _rewrite_same_size(path: Path, *, seed: int, mtime_ns: int) -> None:
    """New voxel values, same byte count (uncompressed .nii), mtime set to ``mtime_ns``."""
    size = path.stat().st_size
    data = np.random.default_rng(seed).random((8, 8, 8), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    assert path.stat().st_size == size
    _age(path, mtime_ns)


def _assert_names(error: pytest.ExceptionInfo, *paths: Path) -> None:
    for path in paths:
        assert str(path) in str(error.value)


# Layouts ------------------------------------------------------------------------------------------


def test_build_manifest_decathlon_reads_name_version_and_pairs(tmp_path):
    root = _decathlon(
        tmp_path / "Task09_Spleen",
        test_cases=("spleen_9",),
        meta={"name": "Spleen", "version": "1.1", "training": []},
    )

    info = build_manifest(root)

    assert (info.name, info.version, info.version_declared) == ("Spleen", "1.1", True)
    assert info.source == str(root.resolve())
    assert [f.path for f in info.files] == [
        "imagesTr/spleen_1.nii.gz",
        "imagesTr/spleen_2.nii.gz",
        "imagesTs/spleen_9.nii.gz",
        "labelsTr/spleen_1.nii.gz",
        "labelsTr/spleen_2.nii.gz",
    ]
    assert {(f.path, f.role, f.case, f.split) for f in info.files} >= {
        ("imagesTr/spleen_1.nii.gz", "image", "spleen_1", "train"),
        ("labelsTr/spleen_1.nii.gz", "label", "spleen_1", "train"),
        ("imagesTs/spleen_9.nii.gz", "image", "spleen_9", "test"),
    }
    first, _, test = info.pairs
    assert first.case == "spleen_1" and first.split == "train"
    assert first.image == root.resolve() / "imagesTr" / "spleen_1.nii.gz"
    assert first.label == root.resolve() / "labelsTr" / "spleen_1.nii.gz"
    assert (test.case, test.label, test.split) == ("spleen_9", None, "test")
    assert info.total_bytes == sum(p.stat().st_size for p in root.rglob("*.nii.gz"))


def test_build_manifest_decathlon_sizes_and_hashes_are_the_files(tmp_path):
    import hashlib

    root = _decathlon(tmp_path / "Task", cases=("c1",))

    info = build_manifest(root)

    for entry in info.files:
        raw = (root / entry.path).read_bytes()
        assert entry.size == len(raw)
        assert entry.sha256 == hashlib.sha256(raw).hexdigest()


def test_build_manifest_decathlon_numeric_version_becomes_text(tmp_path):
    root = _decathlon(tmp_path / "Task", meta={"name": "Spleen", "version": 2})

    assert build_manifest(root).version == "2"


def test_build_manifest_decathlon_skips_hidden_macos_files(tmp_path):
    root = _decathlon(tmp_path / "Task09_Spleen")
    # The Decathlon archives ship AppleDouble files such as imagesTr/._spleen_1.nii.gz.
    (root / "imagesTr" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07" * 20)
    (root / "labelsTr" / "._spleen_1.nii.gz").write_bytes(b"\x00\x05\x16\x07" * 20)

    info = build_manifest(root)

    assert len(info.files) == 4
    assert not any("._" in f.path for f in info.files)


def test_build_manifest_decathlon_without_dataset_json_uses_folder_name(tmp_path):
    root = _decathlon(tmp_path / "Task02_Heart")

    info = build_manifest(root)

    assert info.name == "Task02_Heart"
    assert info.version_declared is False


def test_build_manifest_plain_folder_pairs_by_case_recursively(tmp_path):
    root = _plain(tmp_path / "pairs", cases=("p1", "sub/p2"), ext=".nii")

    info = build_manifest(root)

    assert [p.case for p in info.pairs] == ["p1", "sub/p2"]
    assert info.pairs[1].image == root.resolve() / "sub" / "p2_image.nii"
    assert info.pairs[1].label == root.resolve() / "sub" / "p2_label.nii"
    assert [f.path for f in info.files] == [
        "p1_image.nii",
        "p1_label.nii",
        "sub/p2_image.nii",
        "sub/p2_label.nii",
    ]
    assert {f.split for f in info.files} == {"train"}


def test_build_manifest_plain_folder_refuses_unmatched_volume(tmp_path):
    root = _plain(tmp_path / "pairs")
    stray = _nifti(root / "scan.nii.gz")

    with pytest.raises(DatasetError, match="neither <case>_image nor <case>_label") as error:
        build_manifest(root)
    _assert_names(error, stray)


def test_build_manifest_csv_paths_are_relative_to_the_manifest(tmp_path):
    root = tmp_path / "study"
    _nifti(root / "vols" / "c1.nii.gz", seed=1)
    _nifti(root / "segs" / "c1.nii.gz", seed=1, label=True)
    _nifti(root / "vols" / "c2.nii.gz", seed=2)
    manifest = root / "pairs.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "label", "case", "split", "age"])
        writer.writerow(["vols/c1.nii.gz", "segs/c1.nii.gz", "patient1", "train", "54"])
        writer.writerow(["vols/c2.nii.gz", "", "patient2", "test", "61"])

    info = build_manifest(manifest)

    assert info.name == "study"
    assert info.source == str(manifest.resolve())
    assert [(p.case, p.split) for p in info.pairs] == [("patient1", "train"), ("patient2", "test")]
    assert info.pairs[0].image == root.resolve() / "vols" / "c1.nii.gz"
    assert info.pairs[1].label is None
    assert [(f.path, f.role) for f in info.files] == [
        ("segs/c1.nii.gz", "label"),
        ("vols/c1.nii.gz", "image"),
        ("vols/c2.nii.gz", "image"),
    ]


def test_build_manifest_csv_case_defaults_to_image_name(tmp_path):
    _plain(tmp_path, cases=("liver_3",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\nliver_3_image.nii.gz,liver_3_label.nii.gz\n")

    assert [p.case for p in build_manifest(manifest).pairs] == ["liver_3"]


def test_build_manifest_csv_refuses_unknown_split(tmp_path):
    _plain(tmp_path, cases=("a",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label,split\na_image.nii.gz,a_label.nii.gz,holdout\n")

    with pytest.raises(
        DatasetError, match=r"m\.csv row 2: split 'holdout' is not one of train, val, test"
    ):
        build_manifest(manifest)


def test_build_manifest_csv_missing_file_names_file_and_row(tmp_path):
    _plain(tmp_path, cases=("a",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label\na_image.nii.gz,a_label.nii.gz\nb_image.nii.gz,b_label.nii\n")

    with pytest.raises(DatasetError, match=r"does not exist \(listed in m\.csv row 3\)"):
        build_manifest(manifest)


def test_build_manifest_csv_training_row_without_label_is_refused(tmp_path):
    _plain(tmp_path, cases=("a",))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label,split\na_image.nii.gz,,train\n")

    with pytest.raises(DatasetError, match=r"m\.csv row 2\) has no label") as error:
        build_manifest(manifest)
    _assert_names(error, tmp_path / "a_image.nii.gz")


def test_build_manifest_json_list_manifest(tmp_path):
    _plain(tmp_path / "data", cases=("a", "b"))
    manifest = tmp_path / "list.json"
    manifest.write_text(
        json.dumps(
            [
                {"image": "data/a_image.nii.gz", "label": "data/a_label.nii.gz"},
                {"image": "data/b_image.nii.gz", "label": "data/b_label.nii.gz", "split": "val"},
            ]
        )
    )

    info = build_manifest(manifest)

    assert [(p.case, p.split) for p in info.pairs] == [("a", "train"), ("b", "val")]
    assert info.version_declared is False


def test_build_manifest_json_object_manifest_declares_name_and_version(tmp_path):
    _plain(tmp_path, cases=("a",))
    manifest = tmp_path / "ds.json"
    pairs = [{"image": "a_image.nii.gz", "label": "a_label.nii.gz", "case": "A"}]
    manifest.write_text(json.dumps({"name": "liver", "version": "2024.1", "pairs": pairs}))

    info = build_manifest(manifest)

    assert (info.name, info.version, info.version_declared) == ("liver", "2024.1", True)
    assert info.pairs[0].case == "A"


def test_build_manifest_json_object_without_pairs_is_refused(tmp_path):
    manifest = tmp_path / "ds.json"
    manifest.write_text(json.dumps({"name": "liver"}))

    with pytest.raises(DatasetError, match=r"ds\.json is a JSON object without 'pairs'"):
        build_manifest(manifest)


# Identity: name, version, digest ------------------------------------------------------------------


def test_build_manifest_version_falls_back_to_digest_prefix(tmp_path):
    root = _plain(tmp_path / "my_pairs")

    info = build_manifest(root)

    assert info.name == "my_pairs"
    assert info.version == info.digest[:12]
    assert info.version_declared is False


def test_build_manifest_given_name_and_version_win_over_dataset_json(tmp_path):
    root = _decathlon(tmp_path / "Task", meta={"name": "Spleen", "version": "1.0"})

    info = build_manifest(root, name="spleen-clean", version="3")

    assert (info.name, info.version, info.version_declared) == ("spleen-clean", "3", True)


def test_build_manifest_digest_equal_at_another_location(tmp_path):
    first = _decathlon(tmp_path / "here" / "Task", meta={"name": "Spleen"})
    second = tmp_path / "elsewhere" / "deeper" / "Task"
    shutil.copytree(first, second)  # copies get new mtimes: hashed again, not cache hits

    one = build_manifest(first)
    two = build_manifest(second)

    assert one.source != two.source
    assert one.digest == two.digest
    assert one.files == two.files


def test_build_manifest_digest_changes_when_content_changes_at_same_size(tmp_path):
    root = _plain(tmp_path / "pairs", ext=".nii")
    before = build_manifest(root)
    image = root / "a_image.nii"

    _rewrite_same_size(image, seed=99, mtime_ns=HOUR_AGO_NS)
    after = build_manifest(root)

    assert after.digest != before.digest
    changed = [a for a, b in zip(after.files, before.files, strict=True) if a != b]
    assert [e.path for e in changed] == ["a_image.nii"]
    assert changed[0].size == next(f.size for f in before.files if f.path == "a_image.nii")


def test_build_manifest_digest_changes_when_a_case_is_renamed(tmp_path):
    root = _plain(tmp_path / "pairs", cases=("a",))
    before = build_manifest(root)
    for role in ("image", "label"):
        (root / f"a_{role}.nii.gz").rename(root / f"z_{role}.nii.gz")

    assert build_manifest(root).digest != before.digest


def test_build_manifest_manifest_dict_holds_identity_and_files(tmp_path):
    root = _decathlon(tmp_path / "Task", cases=("c1",), meta={"name": "S", "version": "1"})

    info = build_manifest(root)
    manifest = info.manifest()

    assert manifest["name"] == "S" and manifest["version"] == "1"
    assert manifest["digest"] == info.digest
    assert manifest["files"][0] == {
        "path": "imagesTr/c1.nii.gz",
        "size": info.files[0].size,
        "sha256": info.files[0].sha256,
        "role": "image",
        "case": "c1",
        "split": "train",
    }
    json.dumps(manifest)  # JSON-ready as it is


def test_digest_of_ignores_entry_order(tmp_path):
    info = build_manifest(_plain(tmp_path / "pairs", cases=("a", "b", "c")))

    assert digest_of(reversed(info.files)) == info.digest
    assert digest_of(info.files[1:]) != info.digest


# Progress -----------------------------------------------------------------------------------------


def test_build_manifest_progress_reports_every_hashed_file(tmp_path):
    root = _plain(tmp_path / "pairs", cases=("a", "b", "c"))
    calls: list[tuple[int, int, int]] = []

    info = build_manifest(root, progress=lambda *args: calls.append(args))

    assert calls[0] == (0, 6, 0)  # nothing cached yet
    assert [c[0] for c in calls] == [0, 1, 2, 3, 4, 5, 6]
    assert calls[-1] == (6, 6, info.total_bytes)
    calls.clear()
    build_manifest(root, progress=lambda *args: calls.append(args))
    assert calls == [(6, 6, info.total_bytes)]  # all cached: done at once


# The hash cache -----------------------------------------------------------------------------------


def test_build_manifest_warm_cache_reads_no_file(tmp_path, examined):
    root = _decathlon(tmp_path / "Task", test_cases=("t1",))
    cold = build_manifest(root)
    assert len(examined) == 5
    examined.clear()

    warm = build_manifest(root)

    assert examined == []
    assert warm == cold


def test_build_manifest_cache_trusts_unchanged_size_and_mtime(tmp_path):
    # The cache's contract, as git's and make's: a file whose size and mtime are unchanged is
    # not read again. Content changed behind a restored mtime is therefore not noticed; a
    # build with cache=False is the way to verify such a file.
    root = _plain(tmp_path / "pairs", ext=".nii")
    cached = build_manifest(root)
    _rewrite_same_size(root / "a_image.nii", seed=7, mtime_ns=DAY_AGO_NS)

    assert build_manifest(root).digest == cached.digest
    assert build_manifest(root, cache=False).digest != cached.digest


def test_build_manifest_cache_disabled_reads_every_file_and_writes_no_cache(
    tmp_path, examined, cache_dir
):
    root = _plain(tmp_path / "pairs")

    build_manifest(root, cache=False)
    build_manifest(root, cache=False)

    assert len(examined) == 8
    assert not cache_dir.exists()


def test_build_manifest_default_cache_is_under_mlpipe_cache_dir(tmp_path, cache_dir):
    build_manifest(_plain(tmp_path / "pairs"))

    assert (cache_dir / "hashes.sqlite").is_file()


def test_build_manifest_cache_path_argument_is_the_sqlite_file(tmp_path, examined, cache_dir):
    root = _plain(tmp_path / "pairs")
    own = tmp_path / "elsewhere" / "mine.sqlite"

    build_manifest(root, cache=own)
    build_manifest(root, cache=own)

    assert own.is_file()
    assert not cache_dir.exists()
    assert len(examined) == 4  # the second build hit the cache at that path


def test_build_manifest_broken_cache_file_is_rebuilt(tmp_path, examined, cache_dir):
    root = _plain(tmp_path / "pairs")
    cache_dir.mkdir()
    (cache_dir / "hashes.sqlite").write_bytes(b"this is not an SQLite database\n" * 64)

    first = build_manifest(root)
    second = build_manifest(root)

    assert second == first
    assert len(examined) == 4  # rebuilt by the first build, used by the second


def test_build_manifest_unusable_cache_folder_is_not_fatal(tmp_path, examined):
    root = _plain(tmp_path / "pairs")
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder should be")

    info = build_manifest(root, cache=blocker / "hashes.sqlite")

    assert len(info.files) == 4


def test_build_manifest_recently_modified_files_are_not_cached(tmp_path, examined):
    root = _plain(tmp_path / "pairs", cases=("a",))
    fresh = root / "a_image.nii.gz"
    _age(fresh, time.time_ns())  # written just now: could change again within the same tick

    build_manifest(root)
    examined.clear()
    build_manifest(root)

    assert examined == [fresh.resolve()]


def test_build_manifest_concurrent_builds_share_one_cache(tmp_path):
    roots = [_plain(tmp_path / f"copy{n}", cases=("a", "b", "c")) for n in range(4)]
    results: list[DatasetInfo] = []
    failures: list[BaseException] = []

    def build(root: Path) -> None:
        try:
            results.append(build_manifest(root))
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=build, args=(root,)) for root in roots * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert failures == []
    assert len({info.digest for info in results}) == 1
    assert len(results) == 8


def test_default_cache_path_precedence():
    home = os.path.expanduser("~")

    assert default_cache_path({CACHE_ENV: "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c/hashes.sqlite")
    assert default_cache_path({"XDG_CACHE_HOME": "/x"}) == Path("/x/mlpipe/hashes.sqlite")
    assert default_cache_path({}) == Path(home) / ".cache" / "mlpipe" / "hashes.sqlite"


# Bad input: one DatasetError naming the file, nothing returned ------------------------------------


def test_build_manifest_missing_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"Dataset .*no_such_dir does not exist"):
        build_manifest(tmp_path / "no_such_dir")


def test_build_manifest_empty_folder_is_refused(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "README.txt").write_text("volumes come later")

    with pytest.raises(DatasetError, match=r"No volumes \(\.nii, \.nii\.gz\) found in") as error:
        build_manifest(root)
    _assert_names(error, root)


def test_build_manifest_decathlon_image_without_label_names_expected_label(tmp_path):
    root = _decathlon(tmp_path / "Task")
    lonely = _nifti(root / "imagesTr" / "spleen_3.nii.gz")

    with pytest.raises(DatasetError, match="has no label: expected") as error:
        build_manifest(root)
    _assert_names(error, lonely, root / "labelsTr" / "spleen_3.nii.gz")


def test_build_manifest_plain_image_without_label_names_expected_label(tmp_path):
    root = _plain(tmp_path / "pairs")
    lonely = _nifti(root / "c_image.nii")

    with pytest.raises(DatasetError, match="has no label") as error:
        build_manifest(root)
    _assert_names(error, lonely, root / "c_label.nii")


def test_build_manifest_label_without_image_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task")
    orphan = _nifti(root / "labelsTr" / "spleen_7.nii.gz", label=True)

    with pytest.raises(DatasetError, match="has no image: expected") as error:
        build_manifest(root)
    _assert_names(error, orphan, root / "imagesTr" / "spleen_7.nii.gz")


def test_build_manifest_lists_every_missing_label_in_one_error(tmp_path):
    root = _decathlon(tmp_path / "Task")
    first = _nifti(root / "imagesTr" / "x1.nii.gz")
    second = _nifti(root / "imagesTr" / "x2.nii.gz")

    with pytest.raises(DatasetError, match="2 problems in the dataset") as error:
        build_manifest(root)
    _assert_names(error, first, second)


def test_build_manifest_truncated_gzip_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task")
    _nifti(root / "imagesTr" / "spleen_3.nii.gz", shape=(16, 16, 16))
    _nifti(root / "labelsTr" / "spleen_3.nii.gz", shape=(16, 16, 16), label=True)
    cut = root / "imagesTr" / "spleen_3.nii.gz"
    raw = cut.read_bytes()
    cut.write_bytes(raw[: len(raw) * 2 // 3])  # header intact: only the hashing pass sees it
    _age(cut, HOUR_AGO_NS)

    with pytest.raises(DatasetError, match=r"is a truncated \.nii\.gz") as error:
        build_manifest(root)
    _assert_names(error, cut)


def test_build_manifest_complete_gzip_of_truncated_nifti_is_refused(tmp_path):
    root = _plain(tmp_path / "pairs")
    short = root / "a_image.nii.gz"
    whole = gzip.decompress(short.read_bytes())
    short.write_bytes(gzip.compress(whole[:-100]))  # a complete gzip of a NIfTI cut short

    with pytest.raises(DatasetError, match="but the gzip stream holds") as error:
        build_manifest(root)
    _assert_names(error, short)


def test_build_manifest_text_file_named_nii_gz_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task")
    fake = root / "imagesTr" / "spleen_1.nii.gz"
    fake.write_text("<html>404 Not Found</html>\n" * 10)

    with pytest.raises(DatasetError, match="is not gzip-compressed") as error:
        build_manifest(root)
    _assert_names(error, fake)


def test_build_manifest_gzip_that_is_not_nifti_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task")
    fake = root / "labelsTr" / "spleen_2.nii.gz"
    fake.write_bytes(gzip.compress(b"\x01" * 4000))

    with pytest.raises(DatasetError, match="is not a NIfTI file") as error:
        build_manifest(root)
    _assert_names(error, fake)


def test_build_manifest_empty_volume_file_is_refused(tmp_path):
    root = _plain(tmp_path / "pairs")
    empty = root / "b_label.nii.gz"
    empty.write_bytes(b"")

    with pytest.raises(DatasetError, match=r"is empty \(0 bytes\)") as error:
        build_manifest(root)
    _assert_names(error, empty)


def test_build_manifest_shapes_that_differ_are_refused(tmp_path):
    root = tmp_path / "pairs"
    image = _nifti(root / "a_image.nii.gz", shape=(8, 8, 8))
    label = _nifti(root / "a_label.nii.gz", shape=(8, 8, 6), label=True)

    with pytest.raises(DatasetError, match="has spatial shape 8x8x8 but its label") as error:
        build_manifest(root)
    _assert_names(error, image, label)


def test_build_manifest_shape_check_also_runs_from_cache(tmp_path, examined):
    root = _plain(tmp_path / "pairs", cases=("a",))
    build_manifest(root)
    label = _nifti(root / "b_label.nii.gz", shape=(8, 8, 5), label=True)
    _nifti(root / "b_image.nii.gz")

    with pytest.raises(DatasetError, match="8x8x5"):
        build_manifest(root)
    examined.clear()
    with pytest.raises(DatasetError, match="8x8x5") as error:
        build_manifest(root)  # every file cached now: the shape comes from the cache
    assert examined == []
    _assert_names(error, label)


def test_build_manifest_4d_image_with_matching_3d_label_is_accepted(tmp_path):
    root = _decathlon(tmp_path / "Task01_BrainTumour", cases=())
    _nifti(root / "imagesTr" / "BRATS_001.nii.gz", shape=(8, 8, 8, 4))
    _nifti(root / "labelsTr" / "BRATS_001.nii.gz", shape=(8, 8, 8), label=True)

    info = build_manifest(root)

    assert [p.case for p in info.pairs] == ["BRATS_001"]


def test_build_manifest_4d_label_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task", cases=())
    _nifti(root / "imagesTr" / "c1.nii.gz", shape=(8, 8, 8))
    label = _nifti(root / "labelsTr" / "c1.nii.gz", shape=(8, 8, 8, 1), label=True)

    with pytest.raises(DatasetError, match="has shape 8x8x8x1; a label must be 3D") as error:
        build_manifest(root)
    _assert_names(error, label)


def test_build_manifest_single_volume_is_not_a_dataset(tmp_path):
    volume = _nifti(tmp_path / "ct.nii.gz")

    with pytest.raises(DatasetError, match="is a single volume, not a dataset"):
        build_manifest(volume)


def test_build_manifest_bad_dataset_json_is_refused(tmp_path):
    root = _decathlon(tmp_path / "Task")
    (root / "dataset.json").write_text("{name: Spleen")

    with pytest.raises(DatasetError, match=r"dataset\.json is not valid JSON"):
        build_manifest(root)


def test_build_manifest_error_is_a_usage_error_with_exit_2(tmp_path):
    with pytest.raises(DatasetError) as error:
        build_manifest(tmp_path / "absent")
    assert error.value.exit_code == 2


# issue 20: entries that are not regular files are refused by name, never opened -------------
def _toy_dataset(tmp_path: Path) -> Path:
    from tests.conftest import write_nifti_dataset

    return write_nifti_dataset(tmp_path / "data", cases=2)


def test_build_manifest_fifo_refused_without_opening(tmp_path):
    data = _toy_dataset(tmp_path)
    os.mkfifo(data / "imagesTr" / "x.nii.gz")
    os.mkfifo(data / "labelsTr" / "x.nii.gz")  # a label too, so pairing does not stop first
    outcome: list[BaseException | None] = []

    def scan() -> None:
        try:
            build_manifest(data, cache=False)
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=scan, daemon=True)  # a hang must fail, not block pytest
    worker.start()
    worker.join(timeout=10)
    assert outcome, "build_manifest hung on a named pipe"
    assert isinstance(outcome[0], DatasetError)
    assert f"{data / 'imagesTr' / 'x.nii.gz'} is a named pipe (FIFO)" in str(outcome[0])


def test_build_manifest_symlink_loop_is_a_dataset_error(tmp_path):
    data = _toy_dataset(tmp_path)
    os.symlink("b.nii.gz", data / "imagesTr" / "a.nii.gz")
    os.symlink("a.nii.gz", data / "imagesTr" / "b.nii.gz")
    with pytest.raises(DatasetError, match=r"a\.nii\.gz is a symbolic link loop"):
        build_manifest(data, cache=False)
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    with pytest.raises(DatasetError, match="loop1 is a symbolic link loop"):
        build_manifest(tmp_path / "loop1", cache=False)


def test_build_manifest_dangling_image_link_named_as_such(tmp_path):
    data = _toy_dataset(tmp_path)
    image = data / "imagesTr" / "case_1.nii.gz"
    image.unlink()
    image.symlink_to(tmp_path / "moved" / "case_1.nii.gz")
    with pytest.raises(DatasetError) as info:
        build_manifest(data, cache=False)
    message = str(info.value)
    assert f"{image} is a dangling symbolic link" in message
    assert "has no label" not in message and "has no image" not in message


def test_build_manifest_follows_a_good_symlink(tmp_path):
    data = _toy_dataset(tmp_path)
    image = data / "imagesTr" / "case_1.nii.gz"
    stored = tmp_path / "store.nii.gz"
    shutil.move(image, stored)
    image.symlink_to(stored)
    assert len(build_manifest(data, cache=False).pairs) == 2


def test_csv_manifest_listing_a_fifo_refused(tmp_path):
    data = _toy_dataset(tmp_path)
    os.mkfifo(tmp_path / "pipe.nii.gz")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"image,label\npipe.nii.gz,{data / 'labelsTr' / 'case_0.nii.gz'}\n")
    with pytest.raises(DatasetError, match=r"pipe\.nii\.gz is a named pipe.*listed in pairs\.csv"):
        build_manifest(manifest, cache=False)
