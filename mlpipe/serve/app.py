"""The HTTP layer of ``mlpipe serve``: FastAPI routes, the Swagger page, auth and body limits.

Routes:

* ``POST /segment``: multipart upload of a ``.nii``/``.nii.gz`` or a DICOM series ``.zip`` ->
  the mask as ``.nii.gz`` (the input's shape and affine), or with ``?format=dicom-seg`` a
  DICOM SEG over the series; per-class volumes in the ``X-Class-Volumes-ml`` header;
* ``POST /segment/json``: ``{"nifti_base64": ...}`` -> ``{"mask_base64", "class_volumes_ml",
  "shape", ...}``;
* ``GET /model``: which model, version, run, dataset and preprocessing this server runs;
* ``GET /health``: always open, says nothing about the model;
* ``GET /docs``: Swagger UI, served from the ``swagger-ui-bundle-v2`` package's files (no
  CDN: hospital networks and CI machines often have no internet), with "Try it out" on, so a
  person chooses a file, presses Execute and downloads the mask; ``/openapi.json``.

A guard in front of everything (plain ASGI, so it runs before any body is read) checks the
bearer token and the body size: a ``Content-Length`` over the limit is refused at once, and a
chunked body is counted as it streams in and refused as soon as it passes the limit. Every
error is JSON ``{"detail": ...}``; an unexpected failure answers 500 with an error id and
nothing else (no traceback, no path), and the traceback goes to the server log with that id.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import secrets
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from mlpipe import __version__
from mlpipe.inference.inputs import InputRejected, mask_file_name, safe_upload_name, size_text
from mlpipe.inference.segmenter import ServerBusy

if TYPE_CHECKING:
    from collections.abc import Callable

    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from mlpipe.inference.segmenter import Segmentation
    from mlpipe.serve.service import ServeState

logger = logging.getLogger("mlpipe.serve")

STATIC_PREFIX = "/static/swagger-ui"
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
"""Paths that need no token: the page and the spec carry no data, and probes need /health."""
MULTIPART_OVERHEAD = 64 * 1024
"""Room for the multipart boundaries and part headers around the file itself."""
SMALL_BODY = 64 * 1024
"""The body limit of every other route."""

_ERRORS = {
    400: "Empty or unreadable volume (truncated, corrupt), or base64 that does not decode.",
    401: "Missing or wrong bearer token (when the server runs with --token-env).",
    413: "Larger than the server's --max-bytes.",
    415: "Not a NIfTI volume.",
    422: "Not a 3D volume, or spacing/shape far outside the training data.",
    503: "Too many requests waiting; retry after the Retry-After seconds.",
    500: "Unexpected server error: the answer holds an error id to give the operator.",
}


class SegmentRequest(BaseModel):
    """A volume as base64 (of the ``.nii.gz`` or ``.nii`` file's bytes)."""

    nifti_base64: str = Field(description="Base64 of a .nii.gz or .nii file's bytes.")
    filename: str | None = Field(
        default=None,
        description="The volume's file name, for messages and the input-profile record.",
        examples=["ct_001.nii.gz"],
    )


class SegmentResponse(BaseModel):
    """The mask and what it measures."""

    mask_base64: str = Field(
        description="Base64 of the mask as .nii.gz: uint8 labels, the input's shape and affine."
    )
    class_volumes_ml: dict[str, float] = Field(description="Volume of each foreground class, mL.")
    shape: list[int] = Field(description="The mask's (and the input's) shape.")
    model_version: str | None = None
    request_id: str


class ErrorResponse(BaseModel):
    detail: str
    request_id: str | None = None


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI application for one loaded model (see the module docstring)."""
    source = state.source
    segmenter = state.segmenter
    app = FastAPI(
        title=f"mlpipe serve: {source.label}",
        version=__version__,
        description=_description(state),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    docs_assets = _mount_swagger_assets(app)
    secured = [Depends(HTTPBearer(auto_error=False))] if state.token else []
    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text} for code, text in _ERRORS.items()
    }
    if not state.token:
        errors.pop(401)

    @app.post(
        "/segment",
        operation_id="segment",
        tags=["segmentation"],
        summary="Segment an uploaded NIfTI volume and download the mask",
        response_class=Response,
        dependencies=secured,
        responses={
            200: {
                "description": "The mask as .nii.gz, in the input's own voxel grid (or a DICOM "
                "SEG with format=dicom-seg).",
                "content": {
                    "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                    "application/dicom": {"schema": {"type": "string", "format": "binary"}},
                },
                "headers": {
                    "X-Class-Volumes-ml": {
                        "description": 'JSON: volume of each class in mL, e.g. {"1": 12.3}',
                        "schema": {"type": "string"},
                    },
                    "X-Shape": {
                        "description": "The mask's shape, e.g. 512x512x120",
                        "schema": {"type": "string"},
                    },
                    "X-Model-Version": {"schema": {"type": "string"}},
                    "X-Request-Id": {"schema": {"type": "string"}},
                },
            },
            **errors,
        },
    )
    async def segment(
        file: Annotated[
            UploadFile,
            File(description="A 3D volume: .nii or .nii.gz, or a DICOM series as a .zip."),
        ],
        format: Annotated[
            Literal["nifti", "dicom-seg"],
            Query(description="nifti: the mask as .nii.gz; dicom-seg: a DICOM SEG (series only)"),
        ] = "nifti",
    ) -> Response:
        """Upload a CT or MRI volume (NIfTI, or a DICOM series zipped); the answer is its label
        mask as a `.nii.gz` file, or with `format=dicom-seg` as a DICOM SEG over the series.

        The mask has the input's shape and affine (orientation and spacing), so it overlays
        the input in any viewer; a DICOM SEG references the uploaded slices, one segment per
        class. Per-class volumes in mL are in the `X-Class-Volumes-ml` header.
        """
        request_id = _new_id()
        name = safe_upload_name(file.filename)
        result = await _call(
            lambda: segmenter.segment_stream(file.file, name, request_id, format),
            name,
            request_id,
        )
        if isinstance(result, Response):
            return result
        seg = result.output == "dicom-seg"
        return Response(
            content=result.mask,
            media_type="application/dicom" if seg else "application/gzip",
            headers={
                "Content-Disposition": (
                    f'attachment; filename="{mask_file_name(name, result.output)}"'
                ),
                **_result_headers(result, source.version, request_id),
            },
        )

    @app.post(
        "/segment/json",
        operation_id="segment_json",
        tags=["segmentation"],
        summary="Segment a base64 NIfTI volume; JSON in, JSON out",
        response_model=SegmentResponse,
        dependencies=secured,
        responses=errors,
    )
    async def segment_json(body: SegmentRequest) -> Any:
        """For programs: the volume as base64 in JSON, the mask as base64 in the answer."""
        request_id = _new_id()
        name = safe_upload_name(body.filename)

        def work() -> Segmentation:
            return segmenter.segment_bytes(_decode_base64(body.nifti_base64), name, request_id)

        result = await _call(work, name, request_id)
        if isinstance(result, Response):
            return result
        return SegmentResponse(
            mask_base64=base64.b64encode(result.mask).decode("ascii"),
            class_volumes_ml=result.class_volumes_ml,
            shape=result.shape,
            model_version=source.version,
            request_id=request_id,
        )

    @app.get("/model", tags=["service"], summary="The model this server runs", dependencies=secured)
    async def model() -> dict:
        """Name, version, alias, source run, dataset version and digest, preprocessing digest,
        device, and the limits uploads are checked against."""
        return state.describe()

    @app.get("/health", tags=["service"], summary="Liveness probe (no token needed)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{source.label}: try the model",
            swagger_ui_parameters={
                "deepLinking": True,
                "tryItOutEnabled": True,
                "persistAuthorization": True,
                "displayRequestDuration": True,
                "defaultModelsExpandDepth": -1,
            },
            **docs_assets,
        )

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer lists every error with its "input": the whole request body
        # (600 KB of base64 for a volume in the wrong field). Name the fields, not the data.
        return _error(422, _validation_message(exc), _new_id())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette calls this for what no route caught; the routes catch their own.
        error_id = _new_id()
        logger.error("error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        return _error(500, _internal_message(error_id), error_id)

    limits = {
        "/segment": state.options.max_bytes + MULTIPART_OVERHEAD,
        "/segment/json": 4 * ((state.options.max_bytes + 2) // 3) + MULTIPART_OVERHEAD,
    }
    app.add_middleware(_Guard, token=state.token, limits=limits, max_bytes=state.options.max_bytes)
    return app


async def _call(
    work: Callable[[], Segmentation], name: str, request_id: str
) -> Segmentation | JSONResponse:
    """Run a segmentation in the thread pool; turn its failures into JSON answers."""
    try:
        return await run_in_threadpool(work)
    except InputRejected as exc:
        logger.info("refused %s (request %s): %d %s", name, request_id, exc.status, exc.message)
        return _error(exc.status, exc.message, request_id)
    except ServerBusy as exc:
        logger.warning("busy: refused %s (request %s)", name, request_id)
        return _error(503, str(exc), request_id, headers={"Retry-After": "5"})
    except Exception:
        logger.exception("error %s while segmenting %s", request_id, name)
        return _error(500, _internal_message(request_id), request_id)


def _result_headers(result: Segmentation, version: str | None, request_id: str) -> dict:
    return {
        "X-Class-Volumes-ml": json.dumps(result.class_volumes_ml, separators=(",", ":")),
        "X-Shape": "x".join(str(n) for n in result.shape),
        "X-Model-Version": version or "",
        "X-Request-Id": request_id,
    }


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputRejected(
            400, "nifti_base64 is not base64 text; send base64 of the .nii.gz or .nii file."
        ) from None


def _new_id() -> str:
    return secrets.token_hex(6)


def _internal_message(error_id: str) -> str:
    return (
        f"Internal server error (error id {error_id}). Nothing is wrong with the request as "
        "far as the server can tell; give the error id to the operator, whose log has details."
    )


def _validation_message(exc: RequestValidationError, limit: int = 5) -> str:
    """One short line per problem (where and what), at most ``limit``; never the input."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {str(error.get('msg', 'invalid'))[:200]}")
    more = len(exc.errors()) - limit
    tail = f" (and {more} more)" if more > 0 else ""
    return "Invalid request: " + "; ".join(parts) + tail + ". See /docs for the expected form."


def _error(
    status: int, detail: str, request_id: str | None, headers: dict | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail, "request_id": request_id}
    if status >= 500 and status != 503:
        body["error_id"] = request_id
    extra = {"X-Request-Id": request_id} if request_id else {}
    return JSONResponse(body, status_code=status, headers={**extra, **(headers or {})})


def _description(state: ServeState) -> str:
    info = state.describe()
    dataset = info["dataset"]
    lines = [
        "Upload a 3D CT or MRI volume (`.nii` or `.nii.gz`, or a DICOM series as a `.zip`) to "
        "**POST /segment** (`format=dicom-seg` answers a series with a DICOM SEG): choose the "
        "file, press **Execute**, then **Download file** to get the mask (`.nii.gz`, same "
        "shape and orientation as the upload; per-class volumes in mL in the "
        "`X-Class-Volumes-ml` header).",
        "",
        f"* model: **{info['name'] or info['model_uri']}** version {info['version'] or '-'}"
        + (f" (@{info['alias']})" if info["alias"] else ""),
        f"* source run: `{info['run_id'] or '-'}`",
        f"* dataset: {dataset['name'] or '-'} {dataset['version'] or ''} "
        f"(digest `{(dataset['digest'] or '-')[:12]}`)",
        f"* preprocessing digest: `{(info['preprocessing_digest'] or '-')[:12]}`",
        f"* largest upload: {size_text(state.options.max_bytes)}",
    ]
    if state.token:
        lines += ["", "This server needs a bearer token: press **Authorize** first."]
    return "\n".join(lines)


def _mount_swagger_assets(app: FastAPI) -> dict[str, str]:
    """Serve Swagger UI's JS/CSS from the ``swagger_ui_bundle`` package, not from a CDN.

    Without the package the page falls back to FastAPI's CDN links (and says so in the log):
    it then works only where the browser reaches the internet.
    """
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        logger.warning(
            "swagger-ui-bundle-v2 is not installed: /docs loads Swagger UI from a CDN "
            "(pip install swagger-ui-bundle-v2 to serve it locally)."
        )
        return {}
    from starlette.staticfiles import StaticFiles

    app.mount(STATIC_PREFIX, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")
    return {
        "swagger_js_url": f"{STATIC_PREFIX}/swagger-ui-bundle.js",
        "swagger_css_url": f"{STATIC_PREFIX}/swagger-ui.css",
        "swagger_favicon_url": f"{STATIC_PREFIX}/favicon-32x32.png",
    }


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` as a streamed body passes the limit.

    An ``HTTPException`` because FastAPI passes those through its body parsing unchanged
    (anything else becomes a 400 "error parsing the body"), and renders it as JSON.
    """


class _Guard:
    """Bearer token and body size, checked before a route reads anything (plain ASGI)."""

    def __init__(self, app: ASGIApp, *, token: str | None, limits: dict[str, int], max_bytes: int):
        self.app = app
        self.token = token.encode() if token else None
        self.limits = limits
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.token is not None and not self._open(path) and not self._authorized(scope):
            response = JSONResponse(
                {"detail": "Missing or wrong bearer token: send 'Authorization: Bearer <token>'."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        limit = self.limits.get(path, SMALL_BODY)
        message = (
            f"The request body is larger than this server accepts ({limit} bytes on {path}; "
            f"uploads up to --max-bytes {self.max_bytes} bytes). Crop or downsample the volume."
        )
        length = _content_length(scope)
        if length is not None and length > limit:
            await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(413, message)
            return event

        await self.app(scope, counted, send)

    @staticmethod
    def _open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith(STATIC_PREFIX + "/")

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for key, value in scope.get("headers", []):
            if key == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credentials.strip(), self.token)
        return False


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
