"""``mlpipe doctor``: pre-flight checks of the tracking setup, each PASS, INFO, WARN, FAIL or SKIP.

It answers the questions a researcher has before a long training run, in seconds: does the
tracking server answer and which MLflow runs it, are my credentials accepted, can I create a
run, does a file go up to the artifact store and come back intact, does the registry answer,
which GPU does torch see, which library versions are here.

It must answer fast when the server is down. The MLflow client alone retries a dead server
for about 4 minutes (DESIGN.md), so ``/health`` is asked first with ``urllib`` and a short
timeout, the checks that need the server are skipped when it does not answer, and the
doctor's own MLflow calls run with ``MLFLOW_HTTP_REQUEST_TIMEOUT`` and
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` bounded. ``mlflow`` and ``torch`` are imported only by
the checks that need them (``import mlflow`` alone takes 1-5 s on a loaded machine).

Library only: :func:`run_checks` returns the results; the CLI prints them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import redirect_stdout, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlpipe import __version__
from mlpipe.core.settings import Settings, client_environ, redact_uri
from mlpipe.core.tracking import bounded_http

PASS, INFO, WARN, FAIL, SKIP = "PASS", "INFO", "WARN", "FAIL", "SKIP"
DOCTOR_EXPERIMENT = "mlpipe-doctor"
"""Where the doctor's runs go (after ``experiment_prefix``); one FINISHED run per check."""
PROBE_BYTES = 1024 * 1024
PROBE_DIR = "mlpipe-doctor"
DEFAULT_TIMEOUT_S = 5.0
PACKAGES = ("mlpipe", "mlflow", "torch", "monai", "nibabel")
STORE_CHECKS = ("unsent data", "experiment and run", "artifact round trip", "model registry")


@dataclass(frozen=True)
class CheckResult:
    """One check: what was checked, the verdict, what was found, and the fix when it failed."""

    name: str
    status: str
    detail: str
    fix: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _State:
    settings: Settings
    timeout: float
    keep_artifact: bool
    uri: str = ""
    server_up: bool = False
    logged_in: bool = True
    server_version: str | None = None
    client: object = None
    experiment_id: str | None = None
    run_id: str | None = None
    results: list[CheckResult] = field(default_factory=list)


def run_checks(
    settings: Settings,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    keep_artifact: bool = False,
    progress: Callable[[CheckResult], None] | None = None,
) -> list[CheckResult]:
    """Run every check against the resolved settings; never raises for what it finds.

    Args:
        settings: from :func:`mlpipe.settings.resolve_settings`.
        timeout: seconds each network request may take (the 1 MB transfer gets four times
            as long); requests are retried at most once.
        keep_artifact: leave the 1 MB probe file in the doctor's run (to find it in the
            bucket); by default it is deleted once it came back intact.
        progress: called with each result as soon as it is known.

    Returns:
        The results in order: tracking server, credentials, server version, experiment and
        run, artifact round trip, model registry, GPU, packages.
    """
    state = _State(settings, float(timeout), keep_artifact, settings.tracking_uri.value or "")

    def add(result: CheckResult) -> None:
        state.results.append(result)
        if progress is not None:
            progress(result)

    add(_timed(lambda: _check_health(state)))
    add(_timed(lambda: _check_credentials(state)))
    add(_timed(lambda: _check_version(state)))
    skip = _why_skip_store_checks(state)
    if skip is None:
        # redirect_stdout: MLflow prints "View run ..." links when a run ends; the doctor's
        # output (its --json above all) must stay its own.
        with (
            client_environ(settings),
            bounded_http(state.timeout, retries=1),
            redirect_stdout(io.StringIO()),
        ):
            for check in (_check_outbox, _check_run, _check_artifact, _check_registry):
                add(_timed(lambda check=check: check(state)))
            finished = _timed(lambda: _finish_run(state))
            if finished is not None:
                add(finished)
    else:
        for name in STORE_CHECKS:
            add(CheckResult(name, SKIP, skip))
    add(_timed(_check_gpu))
    add(_timed(lambda: _check_packages(state)))
    return state.results


def _why_skip_store_checks(state: _State) -> str | None:
    settings = state.settings
    if settings.is_server:
        if not state.server_up:
            return "skipped: the tracking server does not answer"
        if not state.logged_in:
            return "skipped: the server refused the login"
        return None
    if settings.tracking_uri.source == "default" and state.uri.startswith("sqlite:///"):
        db = Path(state.uri[len("sqlite:///") :])
        if not db.exists():
            # Nothing is configured and there is no store here: do not leave one behind.
            return (
                f"skipped: no tracking store set and none here ({db.name} would be created "
                "by `mlpipe run`); set MLFLOW_TRACKING_URI or --tracking-uri"
            )
    return None


def exit_code(results: list[CheckResult]) -> int:
    """2 when any check failed (the usage/unreachable code of DESIGN.md), else 0."""
    return 2 if any(r.status == FAIL for r in results) else 0


# --- server checks, over plain HTTP with short timeouts ---------------------------------------


def _check_health(state: _State) -> CheckResult:
    name = "tracking server"
    if not state.settings.is_server:
        return CheckResult(
            name, SKIP, f"{redact_uri(state.uri)} is a local store: no server to ask"
        )
    shown = redact_uri(state.uri)
    status, _body, error = _http_get(state, "/health", auth=False)
    if status == 200:
        state.server_up = True
        return CheckResult(name, PASS, f"{shown} answers /health")
    found = f"HTTP {status}" if status else error
    return CheckResult(
        name,
        FAIL,
        f"{shown} does not answer /health ({found})",
        "Start it (`mlpipe server`, or `mlflow server`) or fix the URI: --tracking-uri, "
        "MLFLOW_TRACKING_URI or tracking_uri in mlpipe.yaml (`mlpipe config show` says which "
        "one is used). Check the host, port, VPN and proxy settings.",
    )


def _check_credentials(state: _State) -> CheckResult:
    name = "credentials"
    if not state.settings.is_server:
        return CheckResult(name, SKIP, "a local store needs no login")
    if not state.server_up:
        return CheckResult(name, SKIP, "skipped: the tracking server does not answer")
    user, kind = _login(state)
    status, body, error = _http_get(state, "/api/2.0/mlflow/experiments/search?max_results=1")
    if status == 200:
        if kind == "none":
            return CheckResult(name, PASS, "the server asks for no login")
        who = f"user {user!r}" if user else "the token"
        return CheckResult(name, PASS, f"accepted for {who} ({kind})")
    if status in (401, 403):
        state.logged_in = False
        if status == 401:
            detail = "HTTP 401: the server refused " + (
                "the request: no credentials are set"
                if kind == "none"
                else f"the credentials of {'user ' + repr(user) if user else 'the token'}"
            )
            fix = (
                "Export MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN) with an account on this server; check for typos in the "
                "password (ask the server's admin to reset it)."
            )
        else:
            detail = f"HTTP 403: user {user!r} may not read experiments on this server"
            fix = "Ask the server's admin for READ permission (MLflow basic auth permissions)."
        return CheckResult(name, FAIL, detail, fix)
    state.logged_in = status is not None and status < 500
    found = f"HTTP {status}: {_first_line(body)}" if status else error
    return CheckResult(
        name,
        FAIL,
        f"the experiments API did not answer ({found})",
        "Look at the tracking server's log; it answers /health but not its API.",
    )


def _check_version(state: _State) -> CheckResult:
    name = "server version"
    client_version = _dist_version("mlflow") or "not installed"
    if not state.settings.is_server:
        return CheckResult(name, SKIP, f"a local store (this client: mlflow {client_version})")
    if not (state.server_up and state.logged_in):
        return CheckResult(name, SKIP, "skipped: the tracking server does not answer")
    status, body, error = _http_get(state, "/version")
    if status != 200:
        found = f"HTTP {status}" if status else error
        return CheckResult(
            name, WARN, f"/version did not answer ({found})", "An MLflow before 2.x, or a proxy."
        )
    server = body.strip()
    state.server_version = server
    detail = f"mlflow {server} on the server, {client_version} here"
    if _minor(server) != _minor(client_version):
        return CheckResult(
            name,
            WARN,
            detail,
            f"Use the same MLflow minor version on both sides: pip install 'mlflow=={server}' "
            "here, or upgrade the server. Mismatched versions can refuse new fields or models.",
        )
    return CheckResult(name, PASS, detail)


# --- MLflow client checks ------------------------------------------------------------------------


def _check_outbox(state: _State) -> CheckResult:
    """Send what runs left unsent while this server was down, and end those runs."""
    name = "unsent data"
    from mlflow import MlflowClient

    from mlpipe.core.outbox import outbox_dir, outbox_files, replay_outbox

    if not outbox_files(state.uri):
        return CheckResult(name, PASS, "nothing waiting in the outbox for this server")
    try:
        replayed = replay_outbox(MlflowClient(tracking_uri=state.uri))
    except Exception as exc:
        return CheckResult(
            name,
            WARN,
            f"could not send what waits in {outbox_dir()}: {_error_line(exc)}",
            "It stays there; the next `mlpipe doctor` or `mlpipe run` tries again.",
        )
    parts = [
        f"run {r.run_id}: dropped (the run no longer exists)"
        if r.gone
        else f"run {r.run_id}: {r.metrics} metric points, {r.params} params sent"
        + (f", marked {r.status}" if r.status else "")
        for r in replayed
    ]
    return CheckResult(name, PASS, "; ".join(parts))


def _check_run(state: _State) -> CheckResult:
    name = "experiment and run"
    from mlflow import MlflowClient

    experiment = state.settings.experiment_name(DOCTOR_EXPERIMENT)
    try:
        client = MlflowClient(
            tracking_uri=state.uri, registry_uri=state.settings.registry_uri.value
        )
        state.client = client
        found = client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        state.experiment_id = (
            found.experiment_id if found is not None else client.create_experiment(experiment)
        )
        run = client.create_run(
            state.experiment_id,
            run_name=f"doctor-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"mlpipe.doctor": "true", "mlpipe.version": __version__},
        )
        state.run_id = run.info.run_id
        client.log_metric(state.run_id, "doctor_check", 1.0)
    except Exception as exc:
        return CheckResult(name, FAIL, _error_line(exc), _client_fix(exc, "create runs"))
    return CheckResult(name, PASS, f"run {state.run_id} created in experiment {experiment!r}")


def _check_artifact(state: _State) -> CheckResult:
    name = "artifact round trip"
    if state.run_id is None:
        return CheckResult(name, SKIP, "skipped: no run could be created")
    client = state.client
    run = client.get_run(state.run_id)  # type: ignore[attr-defined]
    where = run.info.artifact_uri
    payload = os.urandom(PROBE_BYTES)
    digest = hashlib.sha256(payload).hexdigest()
    with tempfile.TemporaryDirectory(prefix="mlpipe-doctor-") as tmp:
        probe = Path(tmp) / "probe.bin"
        probe.write_bytes(payload)
        try:
            with bounded_http(state.timeout * 4, retries=1):
                began = time.monotonic()
                client.log_artifact(state.run_id, str(probe), PROBE_DIR)  # type: ignore[attr-defined]
                up = time.monotonic() - began
                began = time.monotonic()
                back = client.download_artifacts(  # type: ignore[attr-defined]
                    state.run_id, f"{PROBE_DIR}/probe.bin", str(Path(tmp) / "back")
                )
                down = time.monotonic() - began
        except Exception as exc:
            return CheckResult(
                name, FAIL, f"{where}: {_error_line(exc)}", _artifact_fix(where, exc)
            )
        got = hashlib.sha256(Path(back).read_bytes()).hexdigest()
    if got != digest:
        return CheckResult(
            name,
            FAIL,
            f"the 1 MB file came back different from {where} (sha256 {got[:12]} != {digest[:12]})",
            "Something between here and the store changes files: a proxy, or a broken "
            "S3 gateway. Look at the server's log.",
        )
    how = _artifact_route(where)
    kept = ""
    if state.keep_artifact:
        kept = f"; kept at {where}/{PROBE_DIR}/probe.bin"
    else:
        try:
            from mlflow.store.artifact.artifact_repository_registry import (
                get_artifact_repository,
            )

            get_artifact_repository(where, tracking_uri=state.uri).delete_artifacts(PROBE_DIR)
        except Exception as exc:  # the check passed; leaving 1 MB behind is not a failure
            kept = f"; could not delete it afterwards ({_error_line(exc)})"
    return CheckResult(
        name,
        PASS,
        f"1 MB up in {up:.2f} s and back in {down:.2f} s, sha256 identical, {how}{kept}",
    )


def _check_registry(state: _State) -> CheckResult:
    name = "model registry"
    if state.client is None:
        return CheckResult(name, SKIP, "skipped: no client")
    try:
        models = state.client.search_registered_models(max_results=1)  # type: ignore[attr-defined]
    except Exception as exc:
        return CheckResult(name, FAIL, _error_line(exc), _client_fix(exc, "read the registry"))
    where = redact_uri(state.settings.registry_uri.value)
    some = "holds registered models" if len(models) else "answers (no registered model yet)"
    return CheckResult(name, PASS, f"{where} {some}")


def _finish_run(state: _State) -> CheckResult | None:
    """End the doctor's run FINISHED and read the status back; reported only when it fails."""
    if state.run_id is None:
        return None
    try:
        state.client.set_terminated(state.run_id, "FINISHED")  # type: ignore[attr-defined]
        status = state.client.get_run(state.run_id).info.status  # type: ignore[attr-defined]
    except Exception as exc:
        return CheckResult(
            "run ends FINISHED", FAIL, _error_line(exc), _client_fix(exc, "update runs")
        )
    if status != "FINISHED":
        return CheckResult(
            "run ends FINISHED", FAIL, f"run {state.run_id} reads back as {status}", ""
        )
    return None


# --- local checks ---------------------------------------------------------------------------


def _check_gpu() -> CheckResult:
    name = "GPU"
    try:
        import torch
    except ImportError:
        return CheckResult(name, SKIP, "torch is not installed")
    build = torch.version.cuda
    if not torch.cuda.is_available():
        if build is None:
            return CheckResult(
                name, INFO, f"no GPU: torch {torch.__version__} is a CPU-only build; runs use CPU"
            )
        return CheckResult(
            name,
            INFO,
            f"no GPU visible to torch {torch.__version__} (CUDA {build} build); runs use CPU",
            "On a GPU machine: check `nvidia-smi` and CUDA_VISIBLE_DEVICES.",
        )
    try:
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        probe = torch.ones(4, device="cuda") * 2  # a kernel really runs, not only the driver
        ok = float(probe.sum().item()) == 8.0
    except Exception as exc:
        return CheckResult(
            name,
            FAIL,
            f"torch sees CUDA but a kernel failed: {_error_line(exc)}",
            "The NVIDIA driver is too old for this torch's CUDA "
            f"{build}, or the GPU is in a bad state: check `nvidia-smi`.",
        )
    if not ok:
        return CheckResult(name, FAIL, "a GPU kernel returned a wrong result", "Check the GPU.")
    return CheckResult(name, PASS, f"{count} x {', '.join(names)} (CUDA {build})")


def _check_packages(state: _State) -> CheckResult:
    versions = {name: _dist_version(name) for name in PACKAGES}
    shown = ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
    detail = f"python {platform.python_version()}, {shown}"
    if versions["mlflow"] is None:
        return CheckResult("packages", FAIL, detail, "pip install mlpipe (it brings mlflow).")
    return CheckResult("packages", PASS, detail)


# --- helpers ---------------------------------------------------------------------------------


def _timed(check: Callable[[], CheckResult | None]) -> CheckResult | None:
    began = time.monotonic()
    result = check()
    if result is None:
        return None
    return CheckResult(
        result.name, result.status, result.detail, result.fix, round(time.monotonic() - began, 3)
    )


def _http_get(state: _State, path: str, *, auth: bool = True) -> tuple[int | None, str, str]:
    """GET ``path`` on the server: ``(status or None, body, error)``; never raises."""
    url = state.uri.rstrip("/") + path
    request = urllib.request.Request(url)
    if auth:
        header = _auth_header(state)
        if header:
            request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(
            request, timeout=state.timeout, context=_ssl_context()
        ) as response:
            return response.status, response.read(1_000_000).decode("utf-8", "replace"), ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(10_000).decode("utf-8", "replace"), ""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, "", str(reason) or type(exc).__name__


def _login(state: _State) -> tuple[str | None, str]:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or state.settings.tracking_username.value
    if user and os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        return user, "basic auth"
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return None, "token"
    return user, "none"


def _auth_header(state: _State) -> str | None:
    # The same credentials, from the same variables, as the MLflow client sends
    # (mlflow.utils.credentials.get_default_host_creds).
    user, kind = _login(state)
    if kind == "basic auth":
        pair = f"{user}:{os.environ['MLFLOW_TRACKING_PASSWORD']}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")
    if kind == "token":
        return "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"]
    return None


def _ssl_context() -> ssl.SSLContext | None:
    # The MLflow client's TLS settings, so https servers with a private CA check the same way.
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    if cert:
        return ssl.create_default_context(cafile=cert)
    return None


def _artifact_route(artifact_uri: str) -> str:
    if artifact_uri.startswith("mlflow-artifacts:") or "/mlflow-artifacts/" in artifact_uri:
        return "through the tracking server (proxied artifacts)"
    if artifact_uri.startswith("s3://"):
        return f"directly to {artifact_uri.split('/')[2]} on S3 (this machine needs S3 access)"
    return f"to {artifact_uri}"


def _artifact_fix(artifact_uri: str, exc: Exception) -> str:
    if artifact_uri.startswith("mlflow-artifacts:"):
        return (
            "The tracking server could not store or return the file: check its "
            "--artifacts-destination (the bucket exists), its S3 credentials and "
            "MLFLOW_S3_ENDPOINT_URL on the server side, and the server's log."
        )
    if artifact_uri.startswith("s3://"):
        return (
            "This client writes to S3 itself (the server does not proxy artifacts): set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and s3_endpoint_url "
            "(MLFLOW_S3_ENDPOINT_URL), or start the server with --artifacts-destination so "
            "clients need no S3 access."
        )
    return _client_fix(exc, "write artifacts")


def _client_fix(exc: Exception, what: str) -> str:
    code = _http_status(exc)
    if code in (401, 403):
        return (
            f"The server refused to let you {what} (HTTP {code}): check "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD and your permissions."
        )
    return f"The store refused to {what}: see the message, and the tracking server's log."


def _http_status(exc: Exception) -> int | None:
    getter = getattr(exc, "get_http_status_code", None)
    if callable(getter):
        try:
            return int(getter())
        except (TypeError, ValueError):
            return None
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _error_line(exc: BaseException, limit: int = 300) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    with suppress(ValueError, AttributeError):  # REST errors often carry a JSON body
        text = json.loads(text).get("message", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    return _error_line(Exception(text)) if text.strip() else "empty answer"


def _dist_version(name: str) -> str | None:
    if name == "mlpipe":
        return __version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])
