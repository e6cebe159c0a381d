"""Score a logged seg3d model on a dataset's test split: Dice, HD95 and volume error per case.

It goes through the served path on purpose: the model is loaded as the pyfunc a service would
load (``mlflow.pyfunc.load_model``) and fed file paths, and its masks, already mapped back into
each input's own space, are compared with the label files as they are on disk. A bug in
preprocessing, sliding-window inference or the inverse mapping lowers the score here.

Metrics per case and foreground class ``c`` (computed by ``mlpipe.inference.scores``, which
``mlpipe predict --labels`` uses too):

* ``dice_<c>``: 2|P∩G| / (|P|+|G|); NaN when the class is in neither (nothing to score),
* ``hd95_<c>``: 95th percentile symmetric Hausdorff distance in mm (MONAI); NaN when the class
  is in neither, and the volume's diagonal in mm (the worst possible distance) when it is in
  only one of them, so a missed structure counts against the model instead of vanishing,
* ``volume_error_<c>``: |V_pred - V_true| / V_true; NaN when the label has no such voxel.

Means skip NaN. Logged into the active run (started if none, as MLflow's fluent API does):
metrics ``mean_dice``, ``mean_hd95``, ``mean_volume_error``, ``mean_dice_<c>``, the per-case
table (``evaluation/per_case.json`` for the UI, ``evaluation/per_case.csv``) and the test
dataset as a ``test`` input.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np

from mlpipe.inference.scores import (
    HD_PERCENTILE,
    LabelShapeError,
    nanmean,
    score_against_label,
    score_case,
    summarize,
)
from seg3d.config import Seg3dInputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["HD_PERCENTILE", "evaluate", "format_summary", "score_case", "summarize"]

TABLE_ARTIFACT = "evaluation/per_case.json"
CSV_ARTIFACT = "evaluation/per_case.csv"


def evaluate(
    model_uri: str, data_dir: str | os.PathLike[str], *, num_classes: int | None = None
) -> dict:
    """Predict every labelled test case one at a time, score it, log and return the means.

    Args:
        model_uri: the pyfunc, e.g. ``runs:/<run_id>/model`` or ``models:/seg3d/3``.
        data_dir: a dataset with a test split (Decathlon ``imagesTs/`` + ``labelsTs/``, or a
            manifest with ``split: test``); empty for the built-in synthetic dataset.
        num_classes: classes including background; None (the default) takes the model's
            own, read from its output schema; given, it must match the model's.

    Returns:
        ``mean_dice``, ``mean_hd95``, ``mean_volume_error`` and ``mean_dice_<c>`` per class.

    Raises:
        Seg3dInputError: no labelled test case, a model that cannot be loaded or has another
            number of classes, a label whose shape differs from its image's.
        DatasetError: the dataset cannot be read (from ``mlpipe.data.dataset``).
    """
    import mlflow
    import pandas as pd

    import mlpipe.log as mlog
    from mlpipe.data.dataset import build_manifest

    if num_classes is not None and num_classes < 2:
        raise Seg3dInputError(f"num_classes: {num_classes}; need at least 2")
    model = _load_model(model_uri, num_classes)
    num_classes = _model_classes(model) or num_classes or 0
    if num_classes < 2:
        raise Seg3dInputError(
            f"model_uri: {model_uri} has no output schema to read num_classes from; pass "
            "--num-classes"
        )
    if not str(data_dir):
        from seg3d.synthesize import default_dataset

        data_dir = default_dataset(num_classes=num_classes)
    info = build_manifest(data_dir)
    cases = [p for p in info.pairs if p.split == "test" and p.label is not None]
    if not cases:
        raise Seg3dInputError(
            f"data_dir: {data_dir} has no labelled test case; put test images in imagesTs/ and "
            "their labels in labelsTs/ (or give split 'test' in the manifest)"
        )
    # After every check, so bad input logs nothing; starts a run if none is active.
    mlog.dataset(data_dir, context="test")

    rows = []
    for number, pair in enumerate(cases, start=1):
        print(f"seg3d: evaluating {number}/{len(cases)} {pair.case}", file=sys.stderr, flush=True)
        rows.append(_score_pair(model, pair, num_classes))
    table = pd.DataFrame(rows)
    means = summarize(table, num_classes)

    mlflow.log_metrics(means)
    mlflow.log_table(table, artifact_file=TABLE_ARTIFACT)
    mlflow.log_text(table.to_csv(index=False), CSV_ARTIFACT)
    print(format_summary(table, means, num_classes))
    return means


def format_summary(table: pd.DataFrame, means: dict[str, float], num_classes: int) -> str:
    """A few lines for the terminal: per-class means, then the overall ones."""
    lines = [f"{len(table)} test cases", f"{'class':>7} {'dice':>7} {'hd95_mm':>8} {'vol_err':>8}"]
    for c in range(1, num_classes):
        dice = nanmean(table[[f"dice_{c}"]])
        hd95 = nanmean(table[[f"hd95_{c}"]])
        error = nanmean(table[[f"volume_error_{c}"]])
        lines.append(f"{c:>7} {dice:7.3f} {hd95:8.2f} {error:8.3f}")
    lines.append(
        f"{'mean':>7} {means['mean_dice']:7.3f} {means['mean_hd95']:8.2f} "
        f"{means['mean_volume_error']:8.3f}"
    )
    return "\n".join(lines)


# internals -------------------------------------------------------------------------------------
def _model_classes(model) -> int | None:
    """Classes (background included) the model segments, from its ``volume_ml_<c>`` outputs."""
    schema = model.metadata.get_output_schema()
    if schema is None:
        return None
    return 1 + sum(name.startswith("volume_ml_") for name in schema.input_names())


def _load_model(model_uri: str, num_classes: int | None):
    """The pyfunc, refused if it cannot be loaded or segments another number of classes."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise Seg3dInputError(
            f"model_uri: cannot load {model_uri} ({exc.message}); give runs:/<run_id>/model or "
            "models:/<name>/<version>"
        ) from exc
    found = _model_classes(model)
    if found is not None and num_classes is not None and found != num_classes:
        raise Seg3dInputError(
            f"num_classes: {num_classes}, but {model_uri} segments {found} classes; "
            f"pass --num-classes {found} or leave it out (the model's own)"
        )
    return model


def _score_pair(model, pair, num_classes: int) -> dict:
    import pandas as pd

    from seg3d.pyfunc import decode_nifti

    out = model.predict(pd.DataFrame({"path": [str(pair.image)]}))
    prediction = np.asarray(decode_nifti(out.loc[0, "mask"]).dataobj)
    try:
        scores = score_against_label(prediction, pair.label, num_classes=num_classes)
    except LabelShapeError as exc:
        raise Seg3dInputError(str(exc)) from None
    return {"case": pair.case, **scores}
