"""The cluster entry point for real: `ray job submit --working-dir . -- python -m pipelines.<stage> ...` against a
Ray head started with `ray start --head`, for `prepare` then `sid` on a slice of the bundled Amazon Beauty data.

What it proves: the repository uploads as a small working_dir package (.gitignore keeps .venv/.cache/runs out),
the job's Python is the venv's, stage configs resolve from the uploaded copy, two stages connect through a run
directory, and the CLI works against Ray 2.60's token authentication (unauthenticated requests are refused).

The head gets its own temp dir and free ports (the dashboard agent's default port 52365 may be taken by another
local Ray) and runs in its own process group, which the finalizer kills; `ray stop` is not used because it stops
every Ray on the machine.

Run: .venv/bin/pytest tests/test_ray_job_submit.py -m slow -q -s     (under 2 minutes on 2 busy cores)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BEAUTY = REPO / "data" / "amazon_beauty_2014_5core"
SLICE_USERS = 60
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 600


@dataclass
class RayHead:
    dashboard_url: str
    temp_dir: Path
    env: dict[str, str]
    ray: str

    def submit(self, submission_id: str, *entrypoint: str) -> subprocess.CompletedProcess:
        """`ray job submit` from the repository root; returns when the job has ended (the CLI tails its logs)."""
        cmd = [self.ray, "job", "submit", "--address", self.dashboard_url, "--submission-id", submission_id,
               "--working-dir", ".", "--", *entrypoint]
        for _ in range(3):
            result = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
            # Right after start-up the job server may not see the node's agent yet; it waits 10 s, then asks the
            # client to "try again later" without creating the job.
            if "No available agent to submit job" not in result.stdout + result.stderr:
                break
        return result

    def job_info(self, submission_id: str) -> dict:
        request = urllib.request.Request(f"{self.dashboard_url}/api/jobs/{submission_id}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def kill_leftovers(marker: str) -> None:
    """SIGKILL any process whose command line names our private temp dir (workers that left the group)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def ray_head(request) -> RayHead:
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.is_file():
        pytest.skip(f"{ray_cli} not found: run the tests with the project's venv (.venv/bin/pytest)")
    # Short path: Ray puts unix sockets under it (108-byte limit on socket paths).
    temp_dir = Path(tempfile.mkdtemp(prefix="gr2ray-", dir="/tmp"))
    gcs, dash, agent_http, agent_grpc, runtime_env, metrics, client = free_ports(7)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        # The driver runs `python ...` from the job's shell: the venv must come first on the head's PATH.
        PATH=f"{ray_cli.parent}{os.pathsep}{env.get('PATH', '')}",
        # Ray 2.60 turns token auth on by default; a fresh token per test keeps ~/.ray/auth_token out of it.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        RAY_USAGE_STATS_ENABLED="0",
        GR2_CACHE_DIR=str(temp_dir / "cache"),
    )
    cmd = [str(ray_cli), "start", "--head", "--block", "--temp-dir", str(temp_dir),
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
           "--ray-client-server-port", str(client), "--node-ip-address", "127.0.0.1",
           "--num-cpus", "2", "--include-dashboard", "true", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log_lines: list[str] = []
    started = threading.Event()

    def drain() -> None:  # keeps the pipe from filling up and signals readiness (or early exit) without polling
        for line in head.stdout:
            log_lines.append(line)
            if "Ray runtime started" in line:
                started.set()
        started.set()

    threading.Thread(target=drain, daemon=True).start()

    def stop() -> None:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the whole group: GCS, raylet, dashboard, workers, drivers
        except ProcessLookupError:
            pass
        head.wait(timeout=60)
        kill_leftovers(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)

    request.addfinalizer(stop)
    t0 = time.perf_counter()
    if not started.wait(START_TIMEOUT_S) or head.poll() is not None:
        pytest.fail("ray start --head did not come up:\n" + "".join(log_lines[-40:]))
    print(f"\n[ray head] up in {time.perf_counter() - t0:.1f} s at http://127.0.0.1:{dash}")
    return RayHead(f"http://127.0.0.1:{dash}", temp_dir, env, str(ray_cli))


@pytest.fixture(scope="module")
def beauty_slice(tmp_path_factory) -> Path:
    """The first SLICE_USERS users of the bundled data and exactly the items they touched (same file format)."""
    out = tmp_path_factory.mktemp("beauty_slice")
    users = BEAUTY.joinpath("sequences.jsonl").read_text().splitlines()[:SLICE_USERS]
    touched = {item for line in users for item in json.loads(line)["item_ids"]}
    items = [line for line in BEAUTY.joinpath("items.jsonl").read_text().splitlines()
             if json.loads(line)["item_id"] in touched]
    out.joinpath("sequences.jsonl").write_text("\n".join(users) + "\n")
    out.joinpath("items.jsonl").write_text("\n".join(items) + "\n")
    return out


def test_unauthenticated_requests_are_refused(ray_head: RayHead):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_head.dashboard_url}/api/jobs/", timeout=30)
    assert err.value.code == 401


def test_job_runs_on_the_venv_python(ray_head: RayHead):
    submission_id = f"gr2-test-python-{secrets.token_hex(4)}"
    result = ray_head.submit(submission_id, "python", "-c", "import sys; print('PYTHON', sys.executable)")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    printed = [line.split(" ", 1)[1] for line in result.stdout.splitlines() if line.startswith("PYTHON ")]
    assert printed and Path(printed[0]).parent == Path(sys.executable).parent, (printed, sys.executable)


def test_prepare_then_sid_as_ray_jobs(ray_head: RayHead, beauty_slice: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    n_items = len(beauty_slice.joinpath("items.jsonl").read_text().splitlines())
    stages = {
        "prepare": [f"dataset_dir={beauty_slice}"],
        # ~700 items: 2 levels x 64 codes leaves every cell far below the 64 slots of the random last level.
        "sid": ["levels=2", "codebook_size=64", "rq_kmeans.max_iter=20",
                "embed.actors=1", "embed.cpus_per_actor=1", "embed.batch_size=128"],
    }
    for stage, overrides in stages.items():
        submission_id = f"gr2-test-{stage}-{secrets.token_hex(4)}"
        t0 = time.perf_counter()
        result = ray_head.submit(submission_id, "python", "-m", f"pipelines.{stage}",
                                 "--config", f"pipelines/configs/tiny/{stage}.yaml", f"run_dir={run_dir}", *overrides)
        wall = time.perf_counter() - t0
        info = ray_head.job_info(submission_id)
        assert result.returncode == 0 and info["status"] == "SUCCEEDED", \
            f"{stage}: {info['status']} {info.get('message')}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        print(f"[ray job submit] {stage}: {wall:.1f} s wall (submit -> SUCCEEDED)")

    items = pq.read_table(run_dir / "data" / "items.parquet")
    assert items.num_rows == n_items
    for split in ("train", "valid", "test"):
        assert pq.read_table(run_dir / "data" / f"{split}.parquet").num_rows == SLICE_USERS
    assert json.loads((run_dir / "data" / "report.json").read_text())["users"] == SLICE_USERS

    sid_map = pq.read_table(run_dir / "sid" / "sid_map.parquet")
    assert sorted(sid_map.column("item_id").to_pylist()) == sorted(items.column("item_id").to_pylist())
    assert len(set(sid_map.column("sid").to_pylist())) == n_items, "SIDs are not unique"
    assert all(len(codes) == 3 for codes in sid_map.column("codes").to_pylist())  # 2 levels + the random one
    report = json.loads((run_dir / "sid" / "report.json").read_text())
    assert report["unique_fraction"] == 1.0
    print(f"[sid] embed {report['seconds_embed']} s, quantise {report['seconds_quantize']} s for {n_items} items")

    # The uploaded working_dir(s) (one per distinct content of the tree): the project without caches or venvs.
    packages = [p for p in (ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
                if p.is_dir()]
    assert packages
    for package in packages:
        assert (package / "pipelines" / "prepare.py").is_file()
        for excluded in (".venv", ".cache", "runs", ".git"):
            assert not (package / excluded).exists(), f"{excluded} was uploaded with --working-dir ."
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        print(f"[ray job submit] working_dir package {package.name}: {size / 2**20:.1f} MiB")
        assert size < 64 * 2**20
