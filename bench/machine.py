"""What else runs on this machine while a benchmark takes its figures (they share its cores and skew the ratios)."""

from __future__ import annotations

import os
import subprocess


def other_heavy_runs() -> list[str]:
    """Benchmarks, test runs and pipeline stages of others on this machine (`pgrep -af` lines)."""
    found = subprocess.run(["pgrep", "-af", "bench/|pytest|-m pipelines[.]"], capture_output=True, text=True,
                           check=False)
    return [line for line in found.stdout.splitlines() if int(line.split()[0]) not in (os.getpid(), os.getppid())]


def machine() -> dict[str, object]:
    """The CPU a figure was taken on: sessions land on different machines (a 2-core AVX2 box trains ~1.4x slower
    than a 2-core AVX-512 one), so a figure without it cannot be compared."""
    flags, model = set(), ""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "avx512": "avx512f" in flags, "avx2": "avx2" in flags}
