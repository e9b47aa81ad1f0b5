"""One headless Chromium for the run, and Playwright attached to it.

Playwright's sync API keeps an event loop running in the main thread while it is open, so async
tests cannot run while a module holds it. Hence the split: the browser process starts once a run
(``Chromium``), and a module's tests attach Playwright to it over the DevTools protocol only for
as long as the module runs (``attach``)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
START_S = 60.0


@dataclass
class Chromium:
    """A headless Chromium process listening for the DevTools protocol on loopback."""

    process: subprocess.Popen[bytes]
    profile: Path
    endpoint: str  # ws://127.0.0.1:PORT/devtools/browser/ID

    @classmethod
    def start(cls) -> Chromium:
        """Starts the system's Chromium on a fresh profile; returns once it listens."""
        profile = Path(tempfile.mkdtemp(prefix="jb-chromium-"))
        process = subprocess.Popen([CHROMIUM, *ARGS, f"--user-data-dir={profile}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # Chromium writes "PORT\n/devtools/browser/ID" here
        deadline = time.monotonic() + START_S
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                shutil.rmtree(profile, ignore_errors=True)
                raise RuntimeError(f"{CHROMIUM} did not start listening within {START_S:.0f} s "
                                   f"(exit code {process.poll()}): is the chromium package installed?")
            time.sleep(0.05)
        port, path = port_file.read_text().split()
        return cls(process, profile, f"ws://127.0.0.1:{port}{path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextmanager
def attach(chromium: Chromium) -> Iterator[Any]:
    """Playwright's sync ``Browser`` on the running Chromium; each test opens its own pages or
    contexts in it, and what they left open is closed when the block ends."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.connect_over_cdp(chromium.endpoint)
        try:
            yield browser
        finally:
            browser.close()  # closes the contexts made through it and disconnects; the process stays


def ask(page: Any, question: str, tries: int = 3) -> None:
    """Types ``question`` into the page's box and sends it; returns once the chat shows it.

    A fresh page can render its box again just after it appears (while its load event is being
    answered), which drops what was typed before that: the Enter then sends nothing, and the
    question never reaches the server. Such a lost question is typed again, at most ``tries``
    times; a question that reaches the chat is sent exactly once."""
    from playwright.sync_api import expect

    box = page.locator("#jb-input textarea")
    chat = page.locator("#jb-chat")
    for attempt in range(tries):
        box.fill(question)
        expect(box).to_have_value(question)
        box.press("Enter")
        try:
            expect(chat).to_contain_text(question, timeout=20_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise
