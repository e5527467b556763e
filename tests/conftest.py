"""Shared fixtures: small dataset folders written in the documented format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BEAUTY_DIR = REPO_ROOT / "data" / "amazon_beauty_2014_5core"


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def small_dataset(tmp_path: Path) -> Path:
    """Six items, four users; user 4 is too short to split."""
    folder = tmp_path / "ds"
    folder.mkdir()
    items = [
        {"item_id": i, "title": f"Item {i} lipstick", "brand": "Acme", "categories": ["Beauty", "Makeup"]}
        for i in range(1, 7)
    ]
    sequences = [
        {"user_id": 1, "item_ids": [1, 2, 3, 4]},
        {"user_id": 2, "item_ids": [2, 3, 5]},
        {"user_id": 3, "item_ids": [6, 5, 4, 3, 2]},
        {"user_id": 4, "item_ids": [1, 2]},
    ]
    write_jsonl(folder / "items.jsonl", items)
    write_jsonl(folder / "sequences.jsonl", sequences)
    return folder


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray (3 logical CPUs: two Ray Train workers + Ray Data) for a module's training tests."""
    import ray

    from pipelines.common import init_ray, setup_env

    setup_env()
    init_ray(num_cpus=3)
    yield
    ray.shutdown()
