"""Stage `sid`: item text -> embeddings (Ray Data actor pool) -> residual quantisation -> unique semantic IDs.

Reads `<run_dir>/data/items.parquet`; writes `<run_dir>/sid/embeddings.parquet` (cached: a rerun skips the
embedding), `<run_dir>/sid/sid_map.parquet` (item_id, codes, sid) and `<run_dir>/sid/report.json` (uniqueness
before and after the random last level, codebook utilisation per level, largest collision group, timings).

Local:    python -m pipelines.sid --config pipelines/configs/tiny/sid.yaml [quantizer=rq_vae]
Cluster:  ray job submit --working-dir . -- python -m pipelines.sid --config pipelines/configs/qwen3_8b/sid.yaml \
              run_dir=s3://YOUR-BUCKET/gr2/beauty
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.common import already_done, exit_on_user_error, init_ray, local_cpus, parse_cli
from rec.config import Section, StageConfig, config_fingerprint
from rec.io import RunDir
from rec.sid import QUANTIZERS, disambiguate, render_sid, sid_report
from rec.sid.embed import BUNDLED_ENCODER, TextEncoder

log = logging.getLogger("gr2.sid")


class EmbedSection(Section):
    encoder: str = BUNDLED_ENCODER
    """sentence-transformers model: the bundled all-MiniLM-L6-v2, a local directory, or a hub id."""
    batch_size: int = Field(default=512, ge=1)
    """Texts per Ray Data batch handed to an encoder actor."""
    encode_batch_size: int = Field(default=32, ge=1)
    """Texts per encoder forward pass (small batches pad less; 32 was fastest on 2 CPU cores)."""
    actors: int = Field(default=1, ge=1)
    """Encoder actors in the Ray Data actor pool."""
    cpus_per_actor: float = Field(default=2.0, gt=0)
    """Logical CPUs per encoder actor (torch uses that many threads)."""
    gpus_per_actor: float = Field(default=0.0, ge=0)
    """GPUs per encoder actor (0 on CPU machines)."""


class RqKMeansSection(Section):
    max_iter: int = Field(default=100, ge=1)
    """Lloyd iterations per level."""
    n_init: int = Field(default=1, ge=1)
    """k-means++ restarts per level (the best inertia is kept)."""


class RqVaeSection(Section):
    """RQ-VAE settings; the fields of rec.sid.rq_vae.RQVAEParams."""

    latent_dim: int = Field(default=32, ge=1)
    """Dimension of the quantised latent."""
    hidden_dims: list[int] = [512, 256]
    """Encoder MLP widths (the decoder mirrors them)."""
    epochs: int = Field(default=50, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    """AdamW learning rate."""
    weight_decay: float = Field(default=0.0, ge=0)
    beta: float = Field(default=0.25, ge=0)
    """Commitment loss weight."""
    ema: bool = True
    """Update codebooks by exponential moving averages instead of the codebook loss."""
    ema_decay: float = Field(default=0.99, gt=0, lt=1)
    ema_epsilon: float = Field(default=1e-5, gt=0)
    """Laplace smoothing of the EMA cluster sizes."""
    dead_code_reset: bool = True
    """Re-seed codes that went unused during an epoch from current residuals."""
    dead_code_threshold: float = Field(default=1.0, ge=0)
    """Assignments during an epoch below which a code is dead (1 = unused)."""
    diversity_weight: float = Field(default=0.1, ge=0)
    """Weight of the loss pushing the batch's average soft code assignment towards uniform."""
    diversity_temperature: float = Field(default=0.1, gt=0)
    """Softmax temperature of that soft assignment, relative to the batch's mean squared distance."""
    kmeans_init: bool = True
    """Initialise each codebook by k-means on the first pass of residuals."""
    num_threads: int | None = Field(default=1, ge=1)
    """Torch threads during the fit (1 makes codes identical across processes); null leaves them as they are."""


class SidConfig(StageConfig):
    embed: EmbedSection = EmbedSection()
    quantizer: Literal["rq_kmeans", "rq_vae"] = "rq_kmeans"
    """Residual quantiser (registered by name in rec.sid.quantize.QUANTIZERS)."""
    levels: int = Field(default=3, ge=1, le=8)
    """Quantised levels; one more random level is appended so that every SID is unique."""
    codebook_size: int = Field(default=256, ge=2)
    """Codes per level (the last, random level has as many)."""
    rq_kmeans: RqKMeansSection = RqKMeansSection()
    rq_vae: RqVaeSection = RqVaeSection()
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs for a private local Ray (null: what the encoder actors reserve + 1); ignored under a cluster."""
    overwrite: bool = False
    """Recompute the SIDs even if they exist (embeddings are reused while encoder and item texts are unchanged)."""


class EmbedBatch:
    """Ray Data actor: a batch of item texts -> embeddings. The encoder loads once per actor."""

    def __init__(self, encoder: str, batch_size: int, device: str, threads: int):
        import torch

        # Use exactly the CPUs this actor reserved, whatever OMP_NUM_THREADS the worker inherited.
        torch.set_num_threads(threads)
        self.encode = TextEncoder(encoder, batch_size=batch_size, device=device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"item_id": batch["item_id"], "embedding": self.encode(batch["text"].tolist())}


def embed_items(run_dir: RunDir, cfg: EmbedSection) -> tuple[np.ndarray, np.ndarray]:
    """(item_ids, embeddings [items, dim]) in item_id order, computed by a Ray Data actor pool."""
    import ray.data
    from ray.data import ActorPoolStrategy

    items = ray.data.read_parquet(run_dir.path("data", "items.parquet"), filesystem=run_dir.fs).select_columns(
        ["item_id", "text"]
    )
    embedded = items.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={
            "encoder": cfg.encoder,
            "batch_size": cfg.encode_batch_size,
            "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu",
            "threads": max(1, int(cfg.cpus_per_actor)),
        },
        compute=ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    ids, vectors = [], []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        ids.append(batch["item_id"])
        vectors.append(batch["embedding"])
    item_ids = np.concatenate(ids)
    order = np.argsort(item_ids)
    return item_ids[order], np.concatenate(vectors)[order].astype(np.float32)


def items_digest(items: pa.Table) -> str:
    """Hash of the item ids and texts: cached embeddings are reused only for exactly these items."""
    digest = hashlib.sha256()
    for item_id, text in zip(items.column("item_id").to_pylist(), items.column("text").to_pylist()):
        digest.update(f"{item_id}\t{text}\n".encode())
    return digest.hexdigest()


def load_or_embed(run_dir: RunDir, cfg: SidConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Embeddings from the cache file when the same encoder embedded the same items; otherwise compute them."""
    items = run_dir.read_parquet("data", "items.parquet")
    key = {"encoder": cfg.embed.encoder, "items_digest": items_digest(items)}
    if run_dir.exists("sid", "embeddings.parquet"):
        cached = run_dir.read_parquet("sid", "embeddings.parquet")
        metadata = {k.decode(): v.decode() for k, v in (cached.schema.metadata or {}).items()}
        if all(metadata.get(k) == v for k, v in key.items()):
            log.info("sid: reusing cached embeddings of %d items (same encoder, same item texts)", cached.num_rows)
            vectors = np.stack(cached.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
            return cached.column("item_id").to_numpy(), vectors, 0.0
    start = time.perf_counter()
    init_ray(local_cpus(cfg.num_cpus, cfg.embed.actors * cfg.embed.cpus_per_actor, "the encoder actors"))
    log.info("sid: embedding %d items with %s on %d actor(s)", items.num_rows, cfg.embed.encoder, cfg.embed.actors)
    item_ids, vectors = embed_items(run_dir, cfg.embed)
    if not np.array_equal(item_ids, np.sort(items.column("item_id").to_numpy())):
        raise RuntimeError(f"embedded {len(item_ids)} items but data/items.parquet has {items.num_rows}")
    table = pa.table(
        {"item_id": pa.array(item_ids, pa.int64()), "embedding": pa.array(list(vectors), pa.list_(pa.float32()))}
    ).replace_schema_metadata(key)
    run_dir.write_parquet(table, "sid", "embeddings.parquet")
    return item_ids, vectors, time.perf_counter() - start


def run(cfg: SidConfig) -> dict:
    run_dir = RunDir.open(cfg.run_dir)
    fingerprint = config_fingerprint(cfg, exclude={"run_dir", "overwrite", "num_cpus"})
    if already_done(run_dir, ("sid", "report.json"), fingerprint, cfg.overwrite, "sid"):
        return run_dir.read_json("sid", "report.json")
    item_ids, vectors, embed_seconds = load_or_embed(run_dir, cfg)
    start = time.perf_counter()
    params = getattr(cfg, cfg.quantizer).model_dump()
    log.info("sid: fitting %s, %d levels x %d codes on %s", cfg.quantizer, cfg.levels, cfg.codebook_size, vectors.shape)
    codes_before = QUANTIZERS[cfg.quantizer](vectors, cfg.levels, cfg.codebook_size, cfg.seed, **params)
    codes = disambiguate(codes_before, cfg.codebook_size, cfg.seed)
    quantize_seconds = time.perf_counter() - start
    sid_map = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "codes": pa.array(codes.tolist(), pa.list_(pa.int64())),
            "sid": [render_sid(row) for row in codes],
        }
    )
    run_dir.write_parquet(sid_map, "sid", "sid_map.parquet")
    report = {
        **sid_report(codes_before, codes, cfg.codebook_size),
        "quantizer": cfg.quantizer,
        "encoder": cfg.embed.encoder,
        "embedding_dim": int(vectors.shape[1]),
        "seconds_embed": round(embed_seconds, 2),
        "seconds_quantize": round(quantize_seconds, 2),
        "seconds": round(embed_seconds + quantize_seconds, 2),
        "config": fingerprint,
    }
    run_dir.write_json(report, "sid", "report.json")  # written last: marks the stage as done
    return report


def format_report(report: dict) -> str:
    util = ", ".join(f"{u:.3f}" for u in report["utilisation_per_level"])
    return "\n".join(
        [
            f"SIDs for {report['items']} items: {report['levels']} levels x {report['codebook_size']} codes "
            f"({report['quantizer']}, encoder {report['encoder']})",
            f"  unique before last level: {report['unique_fraction_before_last_level']:.4f}   "
            f"after: {report['unique_fraction']:.4f}   largest collision group: {report['max_collision_group']}",
            f"  codebook utilisation per level: {util}",
            f"  seconds: embed {report['seconds_embed']}  quantise {report['seconds_quantize']}  total {report['seconds']}",
        ]
    )


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SidConfig, __doc__, argv)
    report = run(cfg)
    print(format_report(report))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))


if __name__ == "__main__":
    main()
