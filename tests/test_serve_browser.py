"""The /docs page in headless Chromium: a person uploads a NIfTI (or a zipped DICOM series)
and downloads the mask.

Chromium (Debian's ``chromium`` package; ``make browser`` installs it) is driven over the
DevTools protocol through ``--remote-debugging-pipe`` (JSON messages on file descriptors 3
and 4, as Puppeteer does), so no driver or extra Python package is needed. The page must work
offline: Swagger UI's files come from the server itself, and this machine has no internet.

The test opens ``/docs#/segmentation/segment`` (a deep link; "Try it out" is on), finds the
file input of the upload form, gives it a volume (``DOM.setFileInputFiles``, what a file
chooser does), presses Execute, waits for the 200 and the "Download file" link, and reads the
downloaded mask back out of the page: it must be the input's shape and affine.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.test_serve import LPS_AFFINE, MODEL, isolated, log_served_model, write_volume
from tests.test_serve_integration import running_serve

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OPERATION = "#operations-segmentation-segment"


@pytest.fixture(scope="module")
def chromium() -> str:
    if CHROMIUM:
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed; `make install-dev` (make browser) installs it")
    pytest.skip("chromium is not installed: run `make browser` (apt-get install chromium)")


class Browser:
    """Headless Chromium with one page, driven over DevTools on a pipe (fds 3 and 4)."""

    def __init__(self, executable: str, profile_dir: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def wire() -> None:  # in the child: its fd 3 reads commands, fd 4 writes answers
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",  # root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,1600",
                f"--user-data-dir={profile_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=wire,
            pass_fds=(3, 4),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        self.session = attached["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def call(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(timeout=60)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str, *, wait: bool = False):
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": wait},
            session=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for: {expression}")

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._from_chrome], [], [], max(left, 0))
            if not ready:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _execute_upload(browser: Browser, selector: str, path: Path) -> tuple[str, str]:
    """Choose the file, as the file chooser would, press Execute, wait for the 200; return the
    "Download file" name and the downloaded bytes (base64), read back out of the page."""
    document = browser.call("DOM.getDocument", {"depth": 0}, session=True)
    node = browser.call(
        "DOM.querySelector",
        {"nodeId": document["root"]["nodeId"], "selector": selector},
        session=True,
    )["nodeId"]
    browser.call("DOM.setFileInputFiles", {"files": [str(path)], "nodeId": node}, session=True)
    browser.evaluate(f"document.querySelector('{OPERATION} .btn.execute').click()")

    link = f"{OPERATION} .live-responses-table a[download]"
    download = browser.wait_for(f"document.querySelector('{link}')?.getAttribute('download')")
    status = browser.evaluate(
        f"document.querySelector('{OPERATION} .live-responses-table tr.response "
        ".response-col_status').textContent.trim()"
    )
    assert status == "200"
    headers = browser.evaluate(
        f"document.querySelector('{OPERATION} .live-responses-table').textContent"
    )
    assert "x-class-volumes-ml" in headers.lower()
    encoded = browser.evaluate(
        f"fetch(document.querySelector('{link}').href).then(r => r.arrayBuffer())"
        ".then(b => { let s = ''; for (const x of new Uint8Array(b)) s += "
        "String.fromCharCode(x); return btoa(s); })",
        wait=True,
    )
    return download, encoded


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    (root / "model").mkdir()
    with isolated(root / "model"):
        logged = log_served_model(root / "model")
    with running_serve(
        f"models:/{MODEL}@production",
        logged.uri,
        "--profile-file",
        str(root / "profiles.jsonl"),
        log=root / "server.log",
    ) as srv:
        srv.profiles = root / "profiles.jsonl"
        yield srv


@pytest.fixture
def browser(chromium, tmp_path):
    page = Browser(chromium, tmp_path / "chromium-profile")
    yield page
    page.close()


def test_docs_page_uploads_a_volume_and_offers_the_mask(server, browser, tmp_path):
    volume = write_volume(tmp_path / "ct_browser.nii.gz", shape=(30, 34, 22), affine=LPS_AFFINE)
    browser.call("Page.navigate", {"url": f"{server.url}/docs#/segmentation/segment"}, session=True)

    # The page rendered from the server's own Swagger UI files, with the upload form open.
    selector = f"{OPERATION} input[type=file]"
    browser.wait_for(f"document.querySelector({json.dumps(selector)}) !== null")
    title = browser.evaluate("document.querySelector('.title').textContent")
    assert f"mlpipe serve: {MODEL} v1" in title
    scripts = browser.evaluate("[...document.scripts].map(s => s.src).filter(Boolean)")
    assert scripts and all(s.startswith(server.url) for s in scripts)

    download, encoded = _execute_upload(browser, selector, volume)
    assert download == "ct_browser_mask.nii.gz"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))
    assert mask.shape == (30, 34, 22)
    np.testing.assert_allclose(mask.affine, LPS_AFFINE, atol=1e-5)

    shot = browser.call("Page.captureScreenshot", {"format": "png"}, session=True)
    (tmp_path / "docs.png").write_bytes(base64.b64decode(shot["data"]))
    (entry,) = [json.loads(line) for line in server.profiles.read_text().splitlines()]
    assert entry["image"] == "ct_browser.nii.gz" and entry["outcome"] == "served"


def test_docs_page_uploads_a_zipped_dicom_series(server, browser, tmp_path):
    from tests.dicom_factory import ct_volume, write_series, zip_folder

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    write_series(ct_volume((32, 32, 24)), affine, tmp_path / "series", shuffle=True, rename=True)
    archive = zip_folder(tmp_path / "series", tmp_path / "ct_series.zip")
    browser.call("Page.navigate", {"url": f"{server.url}/docs#/segmentation/segment"}, session=True)
    selector = f"{OPERATION} input[type=file]"
    browser.wait_for(f"document.querySelector({json.dumps(selector)}) !== null")

    download, encoded = _execute_upload(browser, selector, archive)

    assert download == "ct_series_mask.nii.gz"
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))
    assert mask.shape == (32, 32, 24)
    np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
    entries = [json.loads(line) for line in server.profiles.read_text().splitlines()]
    assert (entries[-1]["image"], entries[-1]["outcome"]) == ("ct_series.zip", "served")
