"""Run a stage as its own process group and SIGKILL the whole group (driver, its local Ray, workers) once a
condition on its outputs holds: how the resume tests interrupt a stage mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.common import REPO_ROOT


def kill_when(command: list[str], ready: Callable[[], bool], what: str, log_path: Path, timeout: float = 300,
              env: dict[str, str] | None = None) -> None:
    """Start `command`, wait until `ready()` (polling the condition itself, not a sleep), then kill its group.
    Fails with the stage's log if it exits first or `what` does not happen within `timeout` seconds."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"the stage ended before {what}:\n" + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
            time.sleep(0.5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
