"""Headless Chromium for screenshots and rendered DOMs of the dashboard (docs and tests).

Debian: ``apt-get install -y chromium`` (.ci/run installs it when missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(url: str, *, screenshot: Path | None = None, dump_dom: bool = False, window: tuple[int, int] = (1400, 1000),
             budget_ms: int = 8000, timeout: float = 120) -> str:
    """Render ``url`` in headless Chromium: save a screenshot and/or return the rendered DOM."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    if screenshot is not None:
        Path(screenshot).unlink(missing_ok=True)  # so a stale file cannot pass for a new screenshot
    with tempfile.TemporaryDirectory(prefix="fairfront-chromium-") as profile:
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}"]
        if screenshot is not None:
            command.append(f"--screenshot={Path(screenshot).resolve()}")
        if dump_dom:
            command.append("--dump-dom")
        done = subprocess.run([*command, url], capture_output=True, text=True, timeout=timeout, env={**os.environ, "HOME": profile})
    if screenshot is not None and not Path(screenshot).is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
