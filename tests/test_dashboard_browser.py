"""The real dashboard server (``flywheel dashboard RUN_DIR``) rendered in headless Chromium.

Streamlit draws pages client-side over a websocket, so the test drives Debian's
``chromium`` through the DevTools protocol (``websockets``, a Streamlit dependency): it
waits until the Overview has finished running, checks that the generation table is in the
DOM with every recorded candidate, and saves ``test-artifacts/overview.png`` (full page)
and ``overview.html`` for a person to look at.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
from dashboard_replay import replay_run

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium")
SERVER_START_S = 120.0  # a cold Streamlit import on a busy 2-core machine
PAGE_RENDER_S = 180.0
SCREENSHOT_HEIGHT = 2600  # pixels
SETTLE_S = 2.0  # seconds for the last paint before the screenshot
# Flags that work as root on a machine without network or GPU.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
    "--hide-scrollbars",
)
# True once the script run is over: no "Running..." status widget and a title on the page.
RENDERED_JS = """(() => {
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  const title = document.querySelector('h1');
  return !running && !!title && document.body.innerText.includes('Experiments in the run store');
})()"""

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed: `apt-get install -y chromium` "
    "(the Makefile's ensure-chromium target) to run the browser test",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read()
    except OSError:
        return None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``flywheel dashboard`` on the recorded run, on a free port; yields its URL."""
    run_dir = replay_run(tmp_path_factory.mktemp("browser") / "run")
    port = _free_port()
    log = (tmp_path_factory.getbasetemp() / "dashboard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "flywheel.cli", "dashboard", str(run_dir), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # streamlit runs as a child: stop the whole group
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(f"{url}/_stcore/health") == b"ok", SERVER_START_S, "the server")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are skipped)."""
        message_id = next(self.ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile, driven over the DevTools protocol."""
    from websockets.sync.client import connect

    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        port = _wait(
            lambda: active.is_file() and active.read_text().split()[:1], 60, "chromium to start"
        )[0]
        targets = json.loads(_wait(lambda: _get(f"http://127.0.0.1:{port}/json/list"), 30, "CDP"))
        page = next(t for t in targets if t["type"] == "page")
        with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield DevTools(ws)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_overview_renders_the_generation_table(server: str, browser: DevTools) -> None:
    recorded = json.loads(
        (
            Path(__file__).resolve().parent / "fixtures" / "dashboard_run" / "generations.json"
        ).read_text()
    )["generations"]
    browser.call("Page.enable")
    # A tall viewport: Streamlit scrolls inside its own container, so a screenshot shows
    # the viewport only; this one holds the whole Overview.
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=SCREENSHOT_HEIGHT,
        deviceScaleFactor=1,
        mobile=False,
    )
    browser.call("Page.navigate", url=server)
    _wait(lambda: browser.evaluate(RENDERED_JS), PAGE_RENDER_S, "the Overview to finish")
    # Vega-Lite draws after the script run ends; give it a moment before the screenshot.
    _wait(
        lambda: browser.evaluate(
            'document.querySelectorAll(\'[data-testid="stVegaLiteChart"] canvas, '
            '[data-testid="stVegaLiteChart"] svg\').length >= 2'
        ),
        60,
        "the lift and steerability charts",
    )
    time.sleep(SETTLE_S)  # canvas-drawn tables paint a frame after they mount
    table = browser.evaluate(
        "Array.from(document.querySelectorAll('[data-testid=\"stTable\"] table'))"
        ".map(t => t.innerText).join('\\n')"
    )
    header = browser.evaluate("Array.from(document.querySelectorAll('h3')).map(h => h.innerText)")

    ARTIFACTS.mkdir(exist_ok=True)
    shot = browser.call("Page.captureScreenshot", format="png")
    (ARTIFACTS / "overview.png").write_bytes(base64.b64decode(shot["data"]))
    (ARTIFACTS / "overview.html").write_text(browser.evaluate("document.documentElement.outerHTML"))

    assert "Generations" in header
    assert "breadth lift [95% CI]" in table and "decision" in table
    for gen in recorded:
        assert gen["candidate"] in table
        assert gen["decision"].upper() in table
    assert (ARTIFACTS / "overview.png").stat().st_size > 10_000
