"""A page opened in headless Chromium over the DevTools protocol, for the report's tests.

Chromium's `--dump-dom` shows the page after its scripts ran, but not what the page asked the
network for, what it logged, or what its charts drew. Driving the browser over its DevTools
websocket shows all three: every request the page made (Network domain), every console message
and uncaught exception (Runtime and Log domains), values computed in the page (Runtime.evaluate)
and screenshots of any element (Page.captureScreenshot with a clip).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import websocket

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",  # Chromium picks a free port and writes it to DevToolsActivePort
]


class Page:
    """One tab: send DevTools commands, keep every event it sent."""

    def __init__(self, socket: websocket.WebSocket) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self._next = 0

    def send(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        self._next += 1
        self.socket.send(json.dumps({"id": self._next, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.socket.settimeout(max(0.1, deadline - time.monotonic()))
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def requests(self) -> list[str]:
        """Every URL the page asked for, its own file included."""
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and browser log errors (CSP)."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning"):
                found.append(" ".join(str(a.get("value", a)) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                found.append(str(params["exceptionDetails"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(params["entry"]["text"])
        return found

    def screenshot(self, selector: str, path: Path) -> Path:
        """A PNG of the first element matching `selector`, however far down the page."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return {x: r.left + window.scrollX, "
            "y: r.top + window.scrollY, width: r.width, height: r.height}; })()"
        )
        shot = self.send(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={**box, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextmanager
def open_page(path: Path, width: int = 1400, height: int = 1000) -> Iterator[Page]:
    """Open a local file in a fresh headless Chromium; yields once the page has loaded."""
    profile = Path(tempfile.mkdtemp(prefix="advlab-chromium-"))
    env = os.environ | {"DBUS_SESSION_BUS_ADDRESS": "disabled:"}
    process = subprocess.Popen(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        socket = websocket.create_connection(_page_socket(profile), suppress_origin=True)
        page = Page(socket)
        for domain in ("Network", "Runtime", "Log", "Page"):
            page.send(f"{domain}.enable")
        page.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        page.send("Page.navigate", url=path.resolve().as_uri())
        page.wait_for("document.readyState === 'complete'")
        yield page
        socket.close()
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _page_socket(profile: Path, timeout: float = 30) -> str:
    """The websocket of Chromium's first tab, once Chromium says which port it listens on."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not marker.exists() or len(marker.read_text().split()) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("Chromium did not open its DevTools port")
        time.sleep(0.05)
    port = marker.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
        targets = json.load(answer)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
