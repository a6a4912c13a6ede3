"""Load a page in headless Chromium and report what a person would see: console errors,
images that did not load, a screenshot. Talks the DevTools protocol over a pipe
(`--remote-debugging-pipe`: JSON messages separated by NUL bytes on file descriptors 3 and
4), so it needs nothing but the chromium binary; network features are switched off."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--disable-default-apps", "--disable-domain-reliability",
         "--metrics-recording-only", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]


def find_chromium() -> str | None:
    """The path of a Chromium binary, or None (honours $BOXSEG_CHROMIUM)."""
    if os.environ.get("BOXSEG_CHROMIUM"):
        return os.environ["BOXSEG_CHROMIUM"]
    for name in CANDIDATES:
        if (path := shutil.which(name)):
            return path
    return None


@dataclass
class PageReport:
    url: str
    console_errors: list[str] = field(default_factory=list)   # console.error, uncaught exceptions, failed loads
    images: list[dict] = field(default_factory=list)           # {"src", "ok", "width", "height"}
    screenshot: bytes = b""                                    # PNG
    title: str = ""

    @property
    def broken_images(self) -> list[str]:
        return [i["src"] for i in self.images if not i["ok"]]


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int):
        self.proc, self.w, self.r = proc, to_browser, from_browser
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def drain(self, seconds: float) -> None:
        deadline = time.time() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
                self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)


def inspect_page(path: Path, width: int = 1280, height: int = 900, full_page: bool = True,
                 chromium: str | None = None, timeout: float = 60) -> PageReport:
    """Open `path` (a local HTML file) in headless Chromium; return its console errors, the
    load state of every <img>, and a PNG screenshot (the whole page when `full_page`)."""
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium is not installed (Debian: apt-get install chromium)")
    url = Path(path).resolve().as_uri()
    to_r, to_w = os.pipe()      # we write, chromium reads on fd 3
    from_r, from_w = os.pipe()  # chromium writes on fd 4, we read
    profile = tempfile.mkdtemp(prefix="boxseg-chromium-")

    # the shell puts the pipe ends on descriptors 3 and 4, where chromium expects them
    cmd = [shutil.which("bash") or "/bin/sh", "-c", f'exec "$@" 3<&{to_r} 4>&{from_w}', "sh", binary, *FLAGS,
           f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
    proc = subprocess.Popen(cmd, pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    pipe = _Pipe(proc, to_w, from_r)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout)
        pipe.drain(0.5)  # late console messages
        report = PageReport(url)
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                report.console_errors.append(d.get("exception", {}).get("description", d.get("text", "")))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                report.console_errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        js = ("JSON.stringify({title: document.title, images: Array.from(document.images).map(i => ({src: i.src, "
              "ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth, height: i.naturalHeight})), "
              "w: document.documentElement.scrollWidth, h: document.documentElement.scrollHeight})")
        info = json.loads(pipe.send("Runtime.evaluate", {"expression": js, "returnByValue": True},
                                    session=session)["result"]["value"])
        report.title, report.images = info["title"], info["images"]
        if full_page:
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": min(int(info["h"]), 16000),
                                                             "deviceScaleFactor": 1, "mobile": False}, session=session)
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page},
                         session=session, timeout=timeout)
        report.screenshot = base64.b64decode(shot["data"])
        return report
    finally:
        try:
            pipe.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - already gone; killed below either way
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(to_w)
        os.close(from_r)
        shutil.rmtree(profile, ignore_errors=True)
