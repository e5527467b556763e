"""Stage `sid`: item text -> embeddings (Ray Data actor pool) -> residual quantisation -> unique semantic IDs.

Reads `<run_dir>/data/items.parquet`; writes `<run_dir>/sid/embeddings.parquet` (cached: a rerun skips the
embedding), `<run_dir>/sid/sid_map.parquet` (item_id, codes, sid) and `<run_dir>/sid/report.json`: uniqueness
before and after the random last level; per level the codes used, their entropy against its maximum and the share of
the largest code; collision groups; duplicate titles; item texts longer than the encoder window (chunked or cut,
tokens lost); the codebook size asked for and the size used (a catalogue smaller than `codebook_size` gets one code
per item, with a warning); warnings naming the setting to change; timings. The stage prints it as a table.

Local:    python -m pipelines.sid --config pipelines/configs/tiny/sid.yaml [quantizer=rq_vae]
Cluster:  ray job submit --working-dir . -- python -m pipelines.sid --config pipelines/configs/qwen3_8b/sid.yaml \
              run_dir=s3://YOUR-BUCKET/gr2/beauty
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.common import already_done, exit_on_user_error, init_ray, local_cpus, parse_cli
from pipelines.lineage import stage_inputs
from rec.config import ConfigError, Section, StageConfig, config_fingerprint
from rec.io import RunDir
from rec.sid import QUANTIZERS, disambiguate, render_sid, sid_report
from rec.sid.codes import LEVEL_LETTERS
from rec.sid.embed import BUNDLED_ENCODER, EncodedTexts, TextEncoder, window_report
from rec.sid.quantize import fit_codebook_size

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
    long_text: Literal["chunk", "truncate"] = "chunk"
    """A text longer than the encoder window (MiniLM: 256 tokens): `chunk` embeds it in consecutive window-sized
    pieces and averages their embeddings weighted by their token counts; `truncate` cuts it at the window. Either way
    the report counts the texts chunked and cut and the tokens lost."""
    max_chunks: int = Field(default=8, ge=1)
    """Pieces per text with `long_text: chunk` (8 MiniLM windows hold ~2,000 tokens); tokens beyond are cut and
    counted."""


class RqKMeansSection(Section):
    max_iter: int = Field(default=100, ge=1)
    """Lloyd iterations per level."""
    n_init: int = Field(default=1, ge=1)
    """k-means++ restarts per level (the best inertia is kept)."""
    balance: float | None = Field(default=2.0, ge=1.0)
    """No code holds more than `balance` x the average (items / codes): Lloyd's iterations then give a point its
    nearest code with room (balanced k-means). null: plain k-means, whose levels on residuals pile items into a few
    codes. 1.0 forces equal codes at some cost in quantisation error."""


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
    """Codes per level (the last, random level has as many). A catalogue of fewer items gets one code per item
    (`codebook_size_used` in the report, and a warning)."""
    rq_kmeans: RqKMeansSection = RqKMeansSection()
    rq_vae: RqVaeSection = RqVaeSection()
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs for a private local Ray (null: what the encoder actors reserve + 1); ignored under a cluster."""
    overwrite: bool = False
    """Recompute the SIDs even if they exist (embeddings are reused while encoder and item texts are unchanged)."""


class EmbedBatch:
    """Ray Data actor: a batch of item texts -> embeddings and token counts. The encoder loads once per actor."""

    def __init__(self, encoder: str, batch_size: int, device: str, threads: int, long_text: str, max_chunks: int):
        import torch

        # Use exactly the CPUs this actor reserved, whatever OMP_NUM_THREADS the worker inherited.
        torch.set_num_threads(threads)
        self.encoder = TextEncoder(encoder, batch_size=batch_size, device=device, long_text=long_text,
                                   max_chunks=max_chunks)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.encoder.encode(batch["text"].tolist())
        return {"item_id": batch["item_id"], "embedding": out.embeddings, "tokens": out.tokens, "chunks": out.chunks,
                "tokens_lost": out.tokens_lost, "window": np.full(len(out.tokens), out.window, dtype=np.int64)}


STAT_COLUMNS = ("tokens", "chunks", "tokens_lost")


def embed_items(run_dir: RunDir, cfg: EmbedSection) -> tuple[np.ndarray, EncodedTexts]:
    """(item_ids, their embeddings [items, dim] and token counts) in item_id order, from a Ray Data actor pool."""
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
            "long_text": cfg.long_text,
            "max_chunks": cfg.max_chunks,
        },
        compute=ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    columns: dict[str, list[np.ndarray]] = {}
    total, done, started = items.count(), 0, time.perf_counter()
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in batch.items():
            columns.setdefault(name, []).append(values)
        done += len(batch["item_id"])
        log.info("sid: embedded %d / %d items (%.0f items/s)", done, total, done / max(time.perf_counter() - started,
                                                                                       1e-9))
    merged = {name: np.concatenate(parts) for name, parts in columns.items()}
    order = np.argsort(merged["item_id"])
    stats = {name: merged[name][order].astype(np.int64) for name in STAT_COLUMNS}
    encoded = EncodedTexts(merged["embedding"][order].astype(np.float32), **stats, window=int(merged["window"][0]))
    return merged["item_id"][order], encoded


def items_digest(items: pa.Table) -> str:
    """Hash of the item ids and texts: cached embeddings are reused only for exactly these items."""
    digest = hashlib.sha256()
    for item_id, text in zip(items.column("item_id").to_pylist(), items.column("text").to_pylist()):
        digest.update(f"{item_id}\t{text}\n".encode())
    return digest.hexdigest()


def embedding_key(cfg: EmbedSection, items: pa.Table) -> dict[str, str]:
    """What cached embeddings must have been made with to be reused: encoder, long-text handling, item texts."""
    return {"encoder": cfg.encoder, "long_text": cfg.long_text, "max_chunks": str(cfg.max_chunks),
            "items_digest": items_digest(items)}


def load_or_embed(run_dir: RunDir, cfg: SidConfig, items: pa.Table) -> tuple[np.ndarray, EncodedTexts, float]:
    """Embeddings from the cache file when the same encoder and settings embedded the same items; else compute them."""
    key = embedding_key(cfg.embed, items)
    if run_dir.exists("sid", "embeddings.parquet"):
        cached = run_dir.read_parquet("sid", "embeddings.parquet")
        metadata = {k.decode(): v.decode() for k, v in (cached.schema.metadata or {}).items()}
        if all(metadata.get(k) == v for k, v in key.items()):
            log.info("sid: reusing cached embeddings of %d items (same encoder, same item texts)", cached.num_rows)
            vectors = np.stack(cached.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
            stats = {name: cached.column(name).to_numpy() for name in STAT_COLUMNS}
            encoded = EncodedTexts(vectors, **stats, window=int(metadata["window_tokens"]))
            return cached.column("item_id").to_numpy(), encoded, 0.0
    start = time.perf_counter()
    init_ray(local_cpus(cfg.num_cpus, cfg.embed.actors * cfg.embed.cpus_per_actor, "the encoder actors"))
    log.info("sid: embedding %d items with %s on %d actor(s)", items.num_rows, cfg.embed.encoder, cfg.embed.actors)
    item_ids, encoded = embed_items(run_dir, cfg.embed)
    if not np.array_equal(item_ids, np.sort(items.column("item_id").to_numpy())):
        raise RuntimeError(f"embedded {len(item_ids)} items but data/items.parquet has {items.num_rows}")
    write_embeddings(run_dir, key, item_ids, encoded)
    return item_ids, encoded, time.perf_counter() - start


def write_embeddings(run_dir: RunDir, key: dict[str, str], item_ids: np.ndarray, encoded: EncodedTexts) -> None:
    """`sid/embeddings.parquet`: embeddings and token counts per item, `key` (`embedding_key`) in its metadata."""
    table = pa.table(
        {"item_id": pa.array(item_ids, pa.int64()),
         "embedding": pa.array(list(encoded.embeddings), pa.list_(pa.float32())),
         **{name: pa.array(getattr(encoded, name), pa.int64()) for name in STAT_COLUMNS}}
    ).replace_schema_metadata({**key, "window_tokens": str(encoded.window)})
    run_dir.write_parquet(table, "sid", "embeddings.parquet")


def run(cfg: SidConfig) -> dict:
    run_dir = RunDir.open(cfg.run_dir)
    fingerprint = config_fingerprint(cfg, exclude={"run_dir", "overwrite", "num_cpus"}) | {
        "inputs": stage_inputs(run_dir, "sid")}
    if already_done(run_dir, ("sid", "report.json"), fingerprint, cfg.overwrite, "sid", type(cfg)):
        return run_dir.read_json("sid", "report.json")
    items = run_dir.read_parquet("data", "items.parquet")
    item_ids, encoded, embed_seconds = load_or_embed(run_dir, cfg, items)
    codebook_size = fit_codebook_size(cfg.codebook_size, len(item_ids))
    warnings = []
    if codebook_size < cfg.codebook_size:
        warnings.append(
            f"codebook_size={cfg.codebook_size} is more codes than the {len(item_ids)} items can fill: using "
            f"{codebook_size} per level (codebook_size_used), so level a alone tells (nearly) every item apart and "
            f"later levels carry little; set codebook_size to about {math.ceil(len(item_ids) ** (1 / cfg.levels))} "
            "for codes that group items on every level"
        )
        log.warning("sid: %s", warnings[-1])
    start = time.perf_counter()
    params = getattr(cfg, cfg.quantizer).model_dump()
    log.info("sid: fitting %s, %d levels x %d codes on %s", cfg.quantizer, cfg.levels, codebook_size,
             encoded.embeddings.shape)
    codes_before = QUANTIZERS[cfg.quantizer](encoded.embeddings, cfg.levels, codebook_size, cfg.seed, **params)
    try:
        codes = disambiguate(codes_before, codebook_size, cfg.seed)
    except ValueError as err:  # a collision group larger than the last level
        raise ConfigError(f"sid: codebook_size={cfg.codebook_size}, levels={cfg.levels}: {err}") from None
    quantize_seconds = time.perf_counter() - start
    sid_map = pa.table(
        {
            "item_id": pa.array(item_ids, pa.int64()),
            "codes": pa.array(codes.tolist(), pa.list_(pa.int64())),
            "sid": [render_sid(row) for row in codes],
        }
    )
    run_dir.write_parquet(sid_map, "sid", "sid_map.parquet")
    title_of = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    report = {
        **sid_report(codes_before, codes, codebook_size, [title_of[i] for i in item_ids.tolist()], item_ids),
        "codebook_size_configured": cfg.codebook_size,
        "codebook_size_used": codebook_size,
        "encoder_window": window_report(encoded.tokens, encoded.chunks, encoded.tokens_lost, encoded.window,
                                        cfg.embed.long_text, cfg.embed.max_chunks, item_ids),
        "quantizer": cfg.quantizer,
        "encoder": cfg.embed.encoder,
        "embedding_dim": int(encoded.embeddings.shape[1]),
        "seconds_embed": round(embed_seconds, 2),
        "seconds_quantize": round(quantize_seconds, 2),
        "seconds": round(embed_seconds + quantize_seconds, 2),
    }
    for warning in quality_warnings(report, cfg):
        log.warning("sid: %s", warning)
        warnings.append(warning)
    report["warnings"] = warnings
    report["config"] = fingerprint
    run_dir.write_json(report, "sid", "report.json")  # written last: marks the stage as done
    return report


def quality_warnings(report: dict, cfg: SidConfig) -> list[str]:
    """What a person should look at in `report`, each naming the setting that changes it."""
    warnings = []
    maximum = report["entropy_max_bits"]
    # A catalogue sized down to one code per item has nothing left for later levels: the sizing warning says so.
    sized_down = report["codebook_size_used"] < report["codebook_size_configured"]
    for level, (bits, share) in enumerate(
        zip(report["entropy_bits_per_level"][:-1], report["largest_code_share_per_level"][:-1])
    ):
        if maximum - bits > 1.0 and not sized_down:
            if cfg.quantizer == "rq_vae":
                fix = "raise rq_vae.diversity_weight, or use quantizer=rq_kmeans with rq_kmeans.balance"
            elif cfg.rq_kmeans.balance is None:
                fix = "set rq_kmeans.balance=2 to cap every code at twice the average"
            else:
                fix = f"lower rq_kmeans.balance (now {cfg.rq_kmeans.balance:g}; 1 makes every code equal)"
            warnings.append(
                f"level {LEVEL_LETTERS[level]}: entropy {bits:.1f} of {maximum:.1f} bits, the largest code holds "
                f"{share:.1%} of the items (skewed codes crowd candidate lists); {fix}"
            )
    window = report["encoder_window"]
    if window["texts_truncated"]:
        fix = (f"raise embed.max_chunks (now {window['max_chunks']})" if window["long_text"] == "chunk"
               else "set embed.long_text=chunk to embed them whole")
        warnings.append(
            f"{window['texts_truncated']} of {report['items']} item texts ({window['texts_truncated_share']:.2%}) were "
            f"cut at the encoder's {window['window_tokens']}-token window ({window['tokens_lost_total']:,} tokens "
            f"lost, at most {window['tokens_lost_max']:,} of one text, e.g. items {window['truncated_examples'][:5]}); "
            f"{fix}"
        )
    titles = report["duplicate_titles"]
    if titles["groups_with_same_codes"]:
        warnings.append(
            f"{titles['groups_with_same_codes']} of the {titles['titles_shared']} titles shared by several items got "
            "the same codes on every quantised level (only the random last level tells their items apart); give "
            "those items distinguishing text (size, colour, model) in the catalogue if they are different products"
        )
    return warnings


def _level_row(name: str, values: list, fmt: str) -> str:
    return f"  {name:<20}" + "".join(f"{format(v, fmt):>12}" for v in values)


def format_report(report: dict) -> str:
    levels = report["levels"]
    size = report["codebook_size"]
    header = [f"{LEVEL_LETTERS[level]}{' (random)' if level == levels - 1 else ''}" for level in range(levels)]
    lines = [
        f"SIDs for {report['items']} items: {levels - 1} levels x {size} codes + a random last level "
        f"({report['quantizer']}, encoder {report['encoder']})"
        + (f"; codebook_size {report['codebook_size_configured']} asked, {size} used"
           if report.get("codebook_size_configured", size) != size else ""),
        _level_row("level", header, "s"),
        _level_row("codes used", [round(u * size) for u in report["utilisation_per_level"]], "d"),
        _level_row("utilisation", report["utilisation_per_level"], ".3f"),
    ]
    if "entropy_bits_per_level" in report:
        lines += [
            _level_row(f"entropy (max {report['entropy_max_bits']:.2f})", report["entropy_bits_per_level"], ".2f"),
            _level_row("largest code share", report["largest_code_share_per_level"], ".1%"),
        ]
    lines.append(
        f"  unique before last level: {report['unique_fraction_before_last_level']:.4f}   "
        f"after: {report['unique_fraction']:.4f}   largest collision group: {report['max_collision_group']}"
        + (f"   collision groups: {report['collision_groups']} ({report['items_in_collision_groups']} items)"
           if "collision_groups" in report else "")
    )
    if titles := report.get("duplicate_titles"):
        examples = "; ".join(f"{e['title']!r} x{e['items']} (items {', '.join(map(str, e['item_ids']))})"
                             for e in titles["examples"][:3])
        lines.append(
            f"  duplicate titles: {titles['titles_shared']} titles shared by {titles['items']} items, "
            f"{titles['groups_with_same_codes']} of them with the same codes"
            + (f"; e.g. {examples}" if examples else "")
        )
    if window := report.get("encoder_window"):
        mode = f"long_text={window['long_text']}" + (f", max_chunks={window['max_chunks']}"
                                                     if window["long_text"] == "chunk" else "")
        lines.append(
            f"  encoder window {window['window_tokens']} tokens ({mode}): {window['texts_over_window']} texts longer "
            f"({window['texts_over_window_share']:.1%}), {window['texts_chunked']} chunked, "
            f"{window['texts_truncated']} cut ({window['tokens_lost_total']:,} tokens lost, "
            f"at most {window['tokens_lost_max']:,}); longest text {window['tokens_max']:,} tokens"
        )
    lines.append(
        f"  seconds: embed {report['seconds_embed']}  quantise {report['seconds_quantize']}  total {report['seconds']}"
    )
    lines += ["  warnings:", *(f"    - {w}" for w in report["warnings"])] if report.get("warnings") else []
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(SidConfig, __doc__, argv)
    report = run(cfg)
    print(format_report(report))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}))


if __name__ == "__main__":
    main()
