"""What else runs on this machine while a benchmark takes its figures (they share its cores and skew the ratios)."""

from __future__ import annotations

import os
import subprocess


def other_heavy_runs() -> list[str]:
    """Benchmarks, test runs and pipeline stages of others on this machine (`pgrep -af` lines)."""
    found = subprocess.run(["pgrep", "-af", "bench/|pytest|-m pipelines[.]"], capture_output=True, text=True,
                           check=False)
    return [line for line in found.stdout.splitlines() if int(line.split()[0]) not in (os.getpid(), os.getppid())]
