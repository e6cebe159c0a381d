"""The app that ``mlpipe server`` runs inside ``mlflow server``: MLflow's own, artifacts proxied.

MLflow 3.17 advertises ``multipart_downloads_enabled``/``multipart_uploads_enabled`` in
``/api/3.0/mlflow/server-info`` whenever the artifact destination is S3, and its client then
downloads every artifact (of any size) through a presigned link straight to S3 and uploads
files of 500 MB and more the same way (mlflow PR 24341). A client that cannot reach the S3
endpoint the server uses (``http://minio:9000`` inside docker compose, a private VPC endpoint)
then fails, although the server is configured with proxied artifacts. This wrapper keeps every
byte going through the server: it answers ``server-info`` with both flags off and refuses the
presigned and multipart routes with the 501 that MLflow itself returns for a store without
them, so clients that force them (``MLFLOW_ENABLE_PROXY_MULTIPART_*=true``) fall back.

Uploads go to S3 while they arrive: MLflow 3.17's server writes an upload to a temporary
file and only then sends the file to S3, so a 200 MB checkpoint took the time of both steps
(0.6 of a direct boto3 upload, benchmarks/artifact_upload.py). The server's S3 repository is
replaced by :class:`StreamingS3ArtifactRepository`, which feeds the request body to boto3's
multipart transfer as it comes (MLflow's own streaming-upload interface, ``StreamUploadMixin``,
which its upload route already uses for local folders).

``mlflow server --app-name mlpipe`` (or ``mlpipe-basic-auth``) finds these factories through
the ``mlflow.app`` entry points in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import posixpath
import queue
import re
import threading
from collections.abc import AsyncIterable
from mimetypes import guess_type
from typing import Any, BinaryIO

from mlflow.store.artifact.artifact_repo import StreamUploadMixin
from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

_SERVER_INFO = re.compile(r"/3\.0/mlflow/server-info/?$")
_DIRECT_TO_S3 = re.compile(r"/2\.0/mlflow-artifacts/(?:presigned|mpu)(?:/|$)")
_MULTIPART_FLAGS = ("multipart_uploads_enabled", "multipart_downloads_enabled")
# The client falls back to a proxied upload only on a message that starts with this text
# (mlflow.exceptions._UnsupportedMultipartUploadException.MESSAGE).
_UNSUPPORTED = (
    "Multipart upload is not supported for the current artifact repository: "
    "mlpipe server serves artifacts through the tracking server only (no presigned S3 links)."
)


class ProxiedArtifactsOnly:
    """ASGI middleware: no presigned or multipart S3 links; every artifact byte proxied."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if _DIRECT_TO_S3.search(path):
            await _send_json(send, 501, {"error_code": "NOT_IMPLEMENTED", "message": _UNSUPPORTED})
            return
        if _SERVER_INFO.search(path):
            await self.app(scope, receive, _ServerInfoRewriter(send))
            return
        await self.app(scope, receive, send)


class _ServerInfoRewriter:
    """Buffers the server-info response and turns the multipart flags off."""

    def __init__(self, send):
        self.send = send
        self.start: dict | None = None
        self.body = bytearray()

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start = dict(message)
            return
        if message["type"] != "http.response.body" or self.start is None:
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if message.get("more_body"):
            return
        body = bytes(self.body)
        if self.start["status"] == 200:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = None
            if isinstance(payload, dict):
                payload.update(dict.fromkeys(_MULTIPART_FLAGS, False))
                body = json.dumps(payload).encode()
        headers = [
            (k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class StreamingS3ArtifactRepository(S3ArtifactRepository, StreamUploadMixin):
    """MLflow's S3 repository whose uploads go to S3 while the request body arrives.

    Everything else (downloads, listing, deletes) is MLflow's. The object key and the extra
    upload arguments (content type, bucket owner, ``MLFLOW_S3_UPLOAD_EXTRA_ARGS``) are the ones
    ``S3ArtifactRepository.log_artifact`` uses; boto3's managed transfer does the multipart
    upload (parts in parallel, retries, abort on failure) from a non-seekable stream.
    """

    def log_artifact_from_stream(
        self, stream: BinaryIO, artifact_file_name: str, artifact_path: str | None = None
    ) -> None:
        bucket, key, extra = self._destination(artifact_file_name, artifact_path)
        self._get_s3_client().upload_fileobj(
            Fileobj=stream, Bucket=bucket, Key=key, ExtraArgs=extra
        )

    async def log_artifact_from_async_stream(
        self,
        chunks: AsyncIterable[bytes],
        artifact_file_name: str,
        artifact_path: str | None = None,
    ) -> None:
        bucket, key, extra = self._destination(artifact_file_name, artifact_path)
        pipe = _Pipe()
        s3 = self._get_s3_client()

        def upload() -> None:
            try:
                s3.upload_fileobj(Fileobj=pipe, Bucket=bucket, Key=key, ExtraArgs=extra)
            finally:
                pipe.reader_done.set()

        uploading = asyncio.ensure_future(asyncio.to_thread(upload))
        try:
            async for chunk in chunks:
                if uploading.done():
                    break  # S3 refused: its error is raised below
                if chunk and not pipe.offer(chunk):
                    await asyncio.to_thread(pipe.put, chunk)  # S3 is slower: wait for it
            await asyncio.to_thread(pipe.put, _EOF)
        except BaseException as exc:  # the client went away: boto3 aborts the upload
            await asyncio.to_thread(pipe.put, exc)
            with contextlib.suppress(BaseException):
                await uploading
            raise
        await uploading

    def _destination(self, name: str, artifact_path: str | None) -> tuple[str, str, dict]:
        bucket, key = self.parse_s3_compliant_uri(self.artifact_uri)
        if artifact_path:
            key = posixpath.join(key, artifact_path)
        key = posixpath.join(key, os.path.basename(name))
        extra: dict = {}
        content_type, encoding = guess_type(name)
        if content_type is not None:
            extra["ContentType"] = content_type
        if encoding is not None:
            extra["ContentEncoding"] = encoding
        extra.update(self._bucket_owner_params)
        extra.update(self.get_s3_file_upload_extra_args() or {})
        return bucket, key, extra


_EOF = object()


class _Pipe:
    """A non-seekable file object read by boto3 in one thread, fed from the event loop.

    At most ``maxsize`` chunks wait (uvicorn hands over up to 64 KiB at a time), so a slow S3
    holds the client back instead of filling the server's memory.
    """

    def __init__(self, maxsize: int = 256):
        self._queue: queue.Queue = queue.Queue(maxsize)
        self._buffer = bytearray()
        self._eof = False
        self.reader_done = threading.Event()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def offer(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def put(self, item) -> None:
        """Blocks while the queue is full, unless the reader has stopped (S3 failed)."""
        while not self.reader_done.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        while not self._eof and (size < 0 or len(self._buffer) < size):
            item = self._queue.get()
            if item is _EOF:
                self._eof = True
            elif isinstance(item, BaseException):
                raise OSError("the upload to the tracking server was interrupted") from item
            else:
                self._buffer += item
        size = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out


def _stream_s3_uploads() -> None:
    """Make the server's S3 repositories :class:`StreamingS3ArtifactRepository`.

    Registered in this worker process only (the registry MLflow's ``get_artifact_repository``
    reads); the clients' and every other process's S3 repositories are untouched.
    """
    from mlflow.store.artifact.artifact_repository_registry import (
        _artifact_repository_registry,
    )

    _artifact_repository_registry.register("s3", StreamingS3ArtifactRepository)


def create_app() -> ProxiedArtifactsOnly:
    """``mlflow server --app-name mlpipe``: MLflow's FastAPI app, artifacts proxied only."""
    from mlflow.server.fastapi_app import app

    _stream_s3_uploads()
    return ProxiedArtifactsOnly(app)


def create_auth_app() -> ProxiedArtifactsOnly:
    """``mlflow server --app-name mlpipe-basic-auth``: MLflow basic auth, artifacts proxied.

    MLflow's ``create_app`` returns its FastAPI app (with the permission middleware) when
    served by uvicorn, which ``mlflow server`` does by default.
    """
    from mlflow.server.auth import create_app as create_basic_auth_app

    _stream_s3_uploads()
    return ProxiedArtifactsOnly(create_basic_auth_app())


def bootstrap_auth() -> None:
    """Create the auth tables and the admin user once, before any worker starts.

    ``mlflow server`` does this itself only for ``--app-name basic-auth``; without it each
    uvicorn worker would migrate the auth database at the same moment, and a refused password
    would make the workers crash and restart forever instead of failing once, clearly.
    """
    from mlflow.server.auth import bootstrap_admin_user, get_flask_server_secret_key

    get_flask_server_secret_key()
    bootstrap_admin_user()


if __name__ == "__main__":
    import sys

    try:
        bootstrap_auth()
    except Exception as exc:  # the message goes to the parent, which reports it
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
