"""Candidate lists for re-ranker tests, written as the prerank stage writes them (candidates/train.parquet).

The lists are random catalogue items with the target at a random position, so every row is usable by the
traces, SFT and evaluation stages without running a pre-ranker first.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipelines.prerank import CANDIDATES_SCHEMA
from rec.io import RunDir


def write_candidates(run_dir: RunDir, rows: int, seed: int = 0, top_n: int = 10, split: str = "train") -> pa.Table:
    """`rows` rows from the users of data/train.parquet: history = all but the last train item, target = last."""
    rng = np.random.default_rng(seed)
    items = run_dir.read_parquet("sid", "sid_map.parquet").column("item_id").to_numpy()
    users, histories, targets, lists = [], [], [], []
    train = run_dir.read_parquet("data", "train.parquet").to_pydict()
    for user, sequence in zip(train["user_id"], train["item_ids"]):
        if len(users) == rows:
            break
        if len(sequence) < 2:
            continue
        target = sequence[-1]
        others = rng.choice(items[(items != target)], size=top_n - 1, replace=False).tolist()
        others.insert(int(rng.integers(top_n)), target)
        users.append(user)
        histories.append(sequence[:-1])
        targets.append(target)
        lists.append(others)
    if len(users) < rows:
        raise ValueError(f"only {len(users)} users with 2+ train items; ask for fewer rows")
    table = pa.table({"user_id": users, "history": histories, "target": targets, "candidates": lists,
                      "scores": [[-float(i) for i in range(top_n)]] * rows}, schema=CANDIDATES_SCHEMA)
    run_dir.write_parquet(table, "candidates", f"{split}.parquet")
    return table
