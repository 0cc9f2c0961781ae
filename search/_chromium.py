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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # what Chromium's --screenshot writes

DEFAULT_WINDOW = (1400, 1000)  # width, height: the study page's plots side by side


def check_screenshot_path(path: Path) -> None:
    """A screenshot goes to an image file name, never over a study database or a YAML that a
    mistyped argument names (checked before anything is served or annotated)."""
    if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--screenshot: {path} is not an image file name ({', '.join(IMAGE_SUFFIXES)})")
    if Path(path).is_dir():
        raise ValueError(f"--screenshot: {path} is a folder; give a file name ending in .png")


def chromium(url: str, *, screenshot: Path | None = None, dump_dom: bool = False, window: tuple[int, int] = DEFAULT_WINDOW,
             budget_ms: int = 8000, timeout: float = 120) -> str:
    """Render ``url`` in headless Chromium: save a screenshot and/or return the rendered DOM."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("no chromium binary on PATH (Debian: apt-get install -y chromium)")
    if screenshot is not None:
        check_screenshot_path(screenshot)
    with tempfile.TemporaryDirectory(prefix="fairfront-chromium-") as profile:
        # Written in the temporary folder and moved into place only once it exists: a failed
        # render leaves an earlier file as it was, and no stale file passes for a new screenshot.
        drawn = Path(profile) / f"screenshot{Path(screenshot).suffix.lower()}" if screenshot is not None else None
        command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
                   f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={budget_ms}"]
        if drawn is not None:
            command.append(f"--screenshot={drawn}")
        if dump_dom:
            command.append("--dump-dom")
        done = subprocess.run([*command, url], capture_output=True, text=True, timeout=timeout, env={**os.environ, "HOME": profile})
        if drawn is not None:
            if not drawn.is_file():
                raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
            shutil.move(drawn, screenshot)
    return done.stdout
