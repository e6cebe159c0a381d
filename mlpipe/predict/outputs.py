"""Where masks go, written so that a killed batch never leaves half a file, and how a rerun
knows what is already there.

Two parts that plug together:

* a **store** puts whole files under ``--out``: :class:`LocalStore` writes a hidden temporary
  file in the target folder, flushes it to disk and renames it over the final name (a rename
  within one file system is atomic); :class:`S3Store` sends each file as one ``PutObject``
  (S3 makes an object visible only once all of it has arrived);
* a **writer** turns one case's result into files: :class:`NiftiMaskWriter` writes
  ``<case>.nii.gz``. Another output format (e.g. DICOM SEG) is another writer registered in
  :data:`WRITERS`; a case counts as done when every selected writer's files exist.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mlpipe.core.errors import UsageError

if TYPE_CHECKING:
    from mlpipe.core.settings import Settings
    from mlpipe.inference.segmenter import Segmentation
    from mlpipe.predict.inputs import Case

PART_SUFFIX = ".mlpipe-part"
"""Temporary files of :class:`LocalStore` end in this; a rerun removes leftovers of a kill."""


class OutputStore(Protocol):
    """A place that takes whole files by relative name (``ct_001.nii.gz``, ``a/b.nii.gz``)."""

    uri: str

    def existing(self) -> set[str]:
        """Every file name already there (listed once, before the batch starts)."""

    def put(self, name: str, data: bytes) -> None:
        """Write ``data`` as ``name`` atomically: readers see the old file or all of the new."""

    def remove_partials(self) -> int:
        """Remove what a killed batch left half written; how many."""


class MaskWriter(Protocol):
    """One output format: which files a case gets, and writing them."""

    format: str

    def names(self, case: Case) -> list[str]:
        """The file names this format writes for ``case`` (relative to ``--out``)."""

    def write(self, store: OutputStore, case: Case, result: Segmentation) -> list[str]:
        """Write the case's files through ``store``; returns their names."""


@dataclass(frozen=True)
class NiftiMaskWriter:
    """``<case>.nii.gz``: the mask the model returned, uint8, the input's shape and affine."""

    format: str = "nifti"

    def names(self, case: Case) -> list[str]:
        return [f"{case.name}.nii.gz"]

    def write(self, store: OutputStore, case: Case, result: Segmentation) -> list[str]:
        name = self.names(case)[0]
        store.put(name, result.mask)
        return [name]


@dataclass(frozen=True)
class DicomSegWriter:
    """``<case>_seg.dcm``: the mask as a DICOM SEG over the case's source series (highdicom),
    one segment per class, in the series' study so a viewer shows it over the images.

    A SEG copies the source's patient and study modules by design: it is patient data. It goes
    to ``--out`` only, never to the tracking server.
    """

    format: str = "dicom-seg"

    def names(self, case: Case) -> list[str]:
        return [f"{case.name}_seg.dcm"]

    def write(self, store: OutputStore, case: Case, result: Segmentation) -> list[str]:
        import tempfile

        from mlpipe.inference.dicom_seg import seg_for_series

        name = self.names(case)[0]
        with tempfile.TemporaryDirectory(prefix="mlpipe-predict-seg-") as tmp:
            mask = Path(tmp) / "mask.nii.gz"
            mask.write_bytes(result.mask)
            seg = seg_for_series(mask, case.image, Path(tmp) / "seg.dcm", algorithm="mlpipe")
            store.put(name, seg.read_bytes())
        return [name]


WRITERS: dict[str, type] = {"nifti": NiftiMaskWriter, "dicom-seg": DicomSegWriter}
"""Output formats by ``--format`` name; a new format registers its writer class here."""


def make_writers(formats: Sequence[str]) -> list[MaskWriter]:
    """The writers of the given formats, in order.

    Raises:
        UsageError: an unknown format.
    """
    unknown = [f for f in formats if f not in WRITERS]
    if unknown or not formats:
        raise UsageError(
            f"--format {', '.join(unknown) or '(none)'}: expected one of {', '.join(WRITERS)}."
        )
    return [WRITERS[f]() for f in dict.fromkeys(formats)]


def done_cases(cases: Sequence[Case], writers: Sequence[MaskWriter], existing: set[str]) -> set:
    """The names of the cases whose every output file is already in the store."""
    return {c.name for c in cases if all(n in existing for w in writers for n in w.names(c))}


class LocalStore:
    """Files under a local folder, each written to a temporary name and renamed into place."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"--out {root}: cannot create the folder ({exc.strerror or exc}). Give a "
                "folder you can write, or s3://bucket/prefix."
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise UsageError(f"--out {root}: the folder is not writable.")

    def existing(self) -> set[str]:
        found = set()
        for here, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.endswith(PART_SUFFIX):
                    found.add(Path(here, name).relative_to(self.root).as_posix())
        return found

    def put(self, name: str, data: bytes) -> None:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
        try:
            with open(part, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(part, target)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise

    def remove_partials(self) -> int:
        removed = 0
        for part in self.root.rglob(f"*{PART_SUFFIX}"):
            with contextlib.suppress(OSError):
                part.unlink()
                removed += 1
        return removed


class S3Store:
    """Objects under ``s3://bucket/prefix``, each sent whole in one ``PutObject``.

    boto3 is configured as mlpipe's tracking clients are: the S3 endpoint from the settings
    (``MLFLOW_S3_ENDPOINT_URL``, ``mlpipe.yaml``'s ``s3_endpoint_url``), credentials from the
    environment (``AWS_*``) or boto3's own chain; none of them is printed or logged.
    """

    def __init__(self, uri: str, endpoint_url: str | None, client: Any | None = None):
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise UsageError(f"--out {uri}: expected s3://bucket/prefix.")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.client = client or self._client()

    def _client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(retries={"max_attempts": 5, "mode": "standard"})
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check(self) -> None:
        """Fail before the batch when the bucket cannot be reached or read.

        Raises:
            UsageError: naming the bucket, the endpoint and what to check (no secret).
        """
        import botocore.exceptions as bex

        where = self.endpoint_url or "AWS S3"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except bex.NoCredentialsError:
            raise UsageError(
                f"--out {self.uri}: no S3 credentials; export AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)."
            ) from None
        except bex.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "?")
            raise UsageError(
                f"--out {self.uri}: bucket {self.bucket!r} at {where} answered {code}. Create "
                "the bucket, or check the credentials and MLFLOW_S3_ENDPOINT_URL."
            ) from None
        except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as exc:
            raise UsageError(
                f"--out {self.uri}: S3 endpoint {where} does not answer ({type(exc).__name__}). "
                "Check MLFLOW_S3_ENDPOINT_URL or s3_endpoint_url in mlpipe.yaml."
            ) from None

    def existing(self) -> set[str]:
        found = set()
        start = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
            for item in page.get("Contents", []):
                found.add(item["Key"][len(start) :])
        return found

    def put(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def remove_partials(self) -> int:
        return 0  # an interrupted PutObject leaves no object


def open_store(out: str, settings: Settings | None = None) -> OutputStore:
    """The store for ``--out``: ``s3://bucket/prefix`` or a local folder (created).

    Raises:
        UsageError: the folder cannot be created, or the bucket cannot be reached.
    """
    if out.startswith("s3://"):
        endpoint = settings.s3_endpoint_url.value if settings is not None else None
        store = S3Store(out, endpoint)
        store.check()
        return store
    if "://" in out:
        raise UsageError(f"--out {out}: expected a local folder or s3://bucket/prefix.")
    return LocalStore(out)


def store_spec(store: OutputStore) -> Mapping[str, str | None]:
    """What a worker process needs to open the same store (a boto3 client does not pickle)."""
    return {"out": store.uri, "endpoint": getattr(store, "endpoint_url", None)}


def reopen_store(spec: Mapping[str, str | None]) -> OutputStore:
    out = str(spec["out"])
    if out.startswith("s3://"):
        return S3Store(out, spec.get("endpoint"))
    return LocalStore(out)
