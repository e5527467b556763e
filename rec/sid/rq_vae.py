"""RQ-VAE semantic-ID quantiser: an MLP autoencoder whose latent is quantised by `levels` residual codebooks.

    codes = fit_rq_vae(embeddings, levels=3, codebook_size=256, seed=0, ema=True, dead_code_reset=True)

`rec.sid.quantize` selects it as the `rq_vae` quantiser. Three pieces, read top to bottom:

- `ResidualQuantizer`: the codebooks. Level l quantises the residual r_l to its nearest code e_l and passes
  r_{l+1} = r_l - e_l on. Codebooks are either learned by the codebook loss or, with `ema=True`, moved to the
  (Laplace-smoothed) running mean of the residuals assigned to them; codes unused for a whole epoch can be re-seeded
  from random current residuals (`dead_code_reset`). These are the GR2 paper's answers to codebook collapse.
- `RQAutoencoder`: encoder -> quantiser -> decoder, with the straight-through estimator between them.
- `train_rq_vae` / `fit_rq_vae`: k-means initialisation, the training loop (reconstruction + commitment
  (+ codebook) + diversity loss), and the codes of the final encoder pass over all items.

Training is on CPU and deterministic for a seed: the same embeddings, params and seed give the same codes, also
across processes (it runs single-threaded by default, see `RQVAEParams.num_threads`). The global torch RNG is
forked, so the caller's random state is left untouched. ~30 s for 12,101 x 384 embeddings with the defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("gr2.sid")


@dataclass(frozen=True)
class RQVAEParams:
    """Keyword parameters of `fit_rq_vae` (the `rq_vae:` section of the sid stage config)."""

    latent_dim: int = 32
    """Width of the quantised latent (every codebook vector has this size)."""
    hidden_dims: tuple[int, ...] = (512, 256)
    """Encoder hidden widths (input -> 512 -> 256 -> latent); the decoder mirrors them."""
    epochs: int = 50
    """Passes over the items."""
    batch_size: int = 1024
    """Items per optimiser step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    beta: float = 0.25
    """Commitment-loss weight: pulls each residual towards its (fixed) code."""
    ema: bool = True
    """Update codebooks as exponential moving averages of their assigned residuals instead of by gradient."""
    ema_decay: float = 0.99
    """EMA decay of the per-code counts and sums."""
    ema_epsilon: float = 1e-5
    """Laplace smoothing of the EMA counts, so a rarely used code never divides by zero."""
    dead_code_reset: bool = True
    """At the end of each epoch, re-seed codes used fewer than `dead_code_threshold` times from random residuals."""
    dead_code_threshold: float = 1.0
    """Assignments per epoch below which a code counts as dead (1 = never chosen during the epoch)."""
    diversity_weight: float = 0.1
    """Weight of the loss pushing the batch's mean soft code assignment towards uniform (0 = off)."""
    diversity_temperature: float = 0.1
    """Softmax temperature of the soft assignment, relative to the batch's mean squared code distance."""
    kmeans_init: bool = True
    """Initialise each level's codebook by k-means on the first pass of latent residuals (else uniform, tiny)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    num_threads: int | None = 1
    """CPU threads while fitting (torch, and k-means' OpenMP/BLAS), restored afterwards. 1 makes the codes
    bitwise reproducible across processes (multi-threaded kernels reduce in a schedule-dependent order, and the
    plain variant's collapse amplifies last-bit differences) and avoids oversubscribing cores shared with Ray
    workers; None keeps the current settings."""

    def __post_init__(self) -> None:
        if self.latent_dim < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"latent_dim, epochs and batch_size must be >= 1, got {self}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        object.__setattr__(self, "hidden_dims", tuple(int(width) for width in self.hidden_dims))

    @classmethod
    def from_kwargs(cls, **params: Any) -> RQVAEParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise TypeError(f"unknown rq_vae parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**params)


class ResidualQuantizer(nn.Module):
    """`levels` codebooks of `codebook_size` vectors quantising successive residuals of a latent [batch, dim]."""

    def __init__(self, levels: int, codebook_size: int, dim: int, ema: bool, ema_decay: float, ema_epsilon: float):
        super().__init__()
        self.levels, self.codebook_size, self.dim = levels, codebook_size, dim
        self.ema, self.ema_decay, self.ema_epsilon = ema, ema_decay, ema_epsilon
        # The original VQ-VAE init: all codes in a tiny box around the origin. Without k-means init, EMA or resets
        # the nearest few codes win every residual and the rest never move (codebook collapse).
        init = torch.empty(levels, codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.codebooks = nn.Parameter(init, requires_grad=not ema)
        self.register_buffer("ema_counts", torch.ones(levels, codebook_size))
        self.register_buffer("ema_sums", init.clone())
        # Assignments per code since the last dead-code check, and the latest residuals to re-seed codes from.
        self.register_buffer("usage", torch.zeros(levels, codebook_size))
        self.recent_residuals: list[torch.Tensor | None] = [None] * levels

    @torch.no_grad()
    def set_codebook(self, level: int, vectors: torch.Tensor) -> None:
        self.codebooks[level].copy_(vectors)
        self.ema_sums[level].copy_(vectors)
        self.ema_counts[level].fill_(1.0)

    def codebook(self, level: int) -> torch.Tensor:
        # EMA rewrites the codebook in place during the forward pass; autograd needs the values it multiplied by.
        return self.codebooks[level].clone() if self.ema else self.codebooks[level]

    @staticmethod
    def distances(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances [batch, codes] from each residual to each code."""
        return (
            residual.pow(2).sum(1, keepdim=True) - 2 * residual @ codebook.T + codebook.pow(2).sum(1)[None, :]
        ).clamp_min(0.0)

    def forward(
        self, latent: torch.Tensor, diversity_temperature: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(straight-through quantised latent, codes [batch, levels], losses: codebook, commitment, diversity).

        The diversity loss is computed only when `diversity_temperature` is given."""
        residual = latent
        quantized = torch.zeros_like(latent)
        codes: list[torch.Tensor] = []
        codebook_loss = commitment_loss = diversity_loss = latent.new_zeros(())
        for level in range(self.levels):
            codebook = self.codebook(level)
            distances = self.distances(residual, codebook)
            level_codes = distances.argmin(1)
            code_vectors = codebook[level_codes]
            if self.training:
                self._record(level, residual.detach(), level_codes)
            if not self.ema:
                codebook_loss = codebook_loss + F.mse_loss(code_vectors, residual.detach())
            commitment_loss = commitment_loss + F.mse_loss(residual, code_vectors.detach())
            if diversity_temperature is not None:
                diversity_loss = diversity_loss + self.diversity(distances, diversity_temperature)
            quantized = quantized + code_vectors
            # Later levels see the residual left by this level's (fixed) code, so each codebook trains on its own level.
            residual = residual - code_vectors.detach()
            codes.append(level_codes)
        straight_through = latent + (quantized - latent).detach()
        losses = {"codebook": codebook_loss, "commitment": commitment_loss, "diversity": diversity_loss / self.levels}
        return straight_through, torch.stack(codes, 1), losses

    def diversity(self, distances: torch.Tensor, temperature: float) -> torch.Tensor:
        """log K minus the entropy of the batch-mean soft code assignment: 0 when codes are used uniformly."""
        soft = F.softmax(-distances / (temperature * distances.mean().detach() + 1e-12), dim=1)
        mean_soft = soft.mean(0)
        return (mean_soft * torch.log(mean_soft + 1e-12)).sum() + float(np.log(self.codebook_size))

    @torch.no_grad()
    def _record(self, level: int, residual: torch.Tensor, level_codes: torch.Tensor) -> None:
        counts = torch.bincount(level_codes, minlength=self.codebook_size).to(residual.dtype)
        self.usage[level] += counts
        self.recent_residuals[level] = residual
        if self.ema:
            sums = torch.zeros_like(self.ema_sums[level]).index_add_(0, level_codes, residual)
            self.ema_counts[level].mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
            self.ema_sums[level].mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
            total = self.ema_counts[level].sum()
            smoothed = (self.ema_counts[level] + self.ema_epsilon) / (total + self.codebook_size * self.ema_epsilon)
            smoothed = smoothed * total
            self.codebooks[level].copy_(self.ema_sums[level] / smoothed[:, None])

    @torch.no_grad()
    def reset_dead_codes(self, threshold: float, generator: torch.Generator) -> list[int]:
        """Re-seed codes used < `threshold` times since the last call from random recent residuals; clears usage.

        Returns the number of codes reset per level."""
        resets = []
        for level in range(self.levels):
            dead = torch.nonzero(self.usage[level] < threshold).flatten()
            residuals = self.recent_residuals[level]
            if len(dead) == 0 or residuals is None:
                resets.append(0)
                continue
            picks = torch.randint(len(residuals), (len(dead),), generator=generator)
            vectors = residuals[picks]
            self.codebooks[level][dead] = vectors
            # The EMA state must agree with the new code, or the next update drags it straight back.
            self.ema_counts[level][dead] = 1.0
            self.ema_sums[level][dead] = vectors
            resets.append(int(len(dead)))
        self.usage.zero_()
        return resets


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(width_in, width_out))
        if index < len(widths) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class RQAutoencoder(nn.Module):
    """MLP encoder -> residual quantiser -> MLP decoder (mirrored widths)."""

    def __init__(self, input_dim: int, levels: int, codebook_size: int, params: RQVAEParams):
        super().__init__()
        widths = [input_dim, *params.hidden_dims, params.latent_dim]
        self.encoder = _mlp(widths)
        self.decoder = _mlp(widths[::-1])
        self.quantizer = ResidualQuantizer(
            levels, codebook_size, params.latent_dim, params.ema, params.ema_decay, params.ema_epsilon
        )
        # No diversity term at all when its weight is 0: it costs time and its gradient would be zero anyway.
        self.diversity_temperature = params.diversity_temperature if params.diversity_weight > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(reconstruction, codes [batch, levels], losses incl. `reconstruction`)."""
        quantized, codes, losses = self.quantizer(self.encoder(x), self.diversity_temperature)
        reconstruction = self.decoder(quantized)
        losses["reconstruction"] = F.mse_loss(reconstruction, x)
        return reconstruction, codes, losses

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """Codes [items, levels] of every row of `x` (eval mode: no EMA updates, no usage recording)."""
        was_training = self.training
        self.eval()
        codes = [self.quantizer(self.encoder(chunk))[1] for chunk in torch.split(x, batch_size)]
        self.train(was_training)
        return torch.cat(codes)


@dataclass
class RQVAEResult:
    """What `train_rq_vae` returns: the codes of the final pass, the trained model and per-epoch metrics."""

    codes: np.ndarray
    model: RQAutoencoder
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def _kmeans_init(model: RQAutoencoder, x: torch.Tensor, seed: int) -> None:
    """Each level's codebook := k-means centroids of the untrained encoder's latent residuals at that level."""
    from rec.sid.quantize import kmeans

    residual = model.encoder(x)
    for level in range(model.quantizer.levels):
        centroids, labels = kmeans(residual.numpy(), model.quantizer.codebook_size, seed + level, max_iter=50)
        model.quantizer.set_codebook(level, torch.from_numpy(centroids))
        residual = residual - torch.from_numpy(centroids)[torch.from_numpy(labels)]


def train_rq_vae(
    embeddings: np.ndarray, levels: int, codebook_size: int, seed: int, params: RQVAEParams | None = None
) -> RQVAEResult:
    """Train an RQ-VAE on `embeddings` [items, dim] and return its codes, model and per-epoch history."""
    params = params or RQVAEParams()
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"embeddings must be a non-empty [items, dim] array, got shape {embeddings.shape}")
    if params.kmeans_init and len(embeddings) < codebook_size:
        raise ValueError(f"k-means init needs >= codebook_size={codebook_size} items, got {len(embeddings)}")
    with _thread_limit(params.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _train(torch.from_numpy(embeddings), levels, codebook_size, seed, params)


@contextmanager
def _thread_limit(num_threads: int | None) -> Iterator[None]:
    """Limit torch's and the OpenMP/BLAS pools' threads (see `RQVAEParams.num_threads`), restoring them after."""
    if num_threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency; covers k-means' OpenMP and BLAS

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with threadpool_limits(limits=num_threads):
            yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat denormal floats as zero: once a run collapses, many of the encoder's gradients are denormal and CPU
    matmuls on them run ~3x slower. torch has no getter for the flag, so it is switched back to its default."""
    flushing = torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        yield
    finally:
        if flushing:
            torch.set_flush_denormal(False)


def _train_epoch(
    model: RQAutoencoder, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor], params: RQVAEParams
) -> dict[str, float]:
    """One pass over `batches` (rows of the embeddings); returns the mean of each loss term."""
    totals = {"loss": 0.0, "reconstruction": 0.0, "commitment": 0.0, "codebook": 0.0, "diversity": 0.0}
    for batch in batches:
        _, _, losses = model(batch)
        loss = (
            losses["reconstruction"]
            + losses["codebook"]
            + params.beta * losses["commitment"]
            + params.diversity_weight * losses["diversity"]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += float(loss.detach())
        for name, value in losses.items():
            totals[name] += float(value.detach())
    return {name: value / len(batches) for name, value in totals.items()}


def _train(x: torch.Tensor, levels: int, codebook_size: int, seed: int, params: RQVAEParams) -> RQVAEResult:
    """k-means init, the epochs (with dead-code resets between them), the final pass; torch is already seeded."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    model = RQAutoencoder(x.shape[1], levels, codebook_size, params)
    if params.kmeans_init:
        _kmeans_init(model, x, seed)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=params.lr, weight_decay=params.weight_decay
    )
    history: list[dict[str, Any]] = []
    model.train()
    for epoch in range(params.epochs):
        batches = [x[rows] for rows in torch.split(torch.from_numpy(rng.permutation(len(x))), params.batch_size)]
        with _flush_denormals():
            record: dict[str, Any] = {"epoch": epoch, **_train_epoch(model, optimizer, batches, params)}
        usage = model.quantizer.usage
        record["utilisation_per_level"] = [float((usage[level] > 0).float().mean()) for level in range(levels)]
        if params.dead_code_reset:
            record["dead_codes_reset"] = model.quantizer.reset_dead_codes(params.dead_code_threshold, generator)
        else:
            usage.zero_()
        history.append(record)
        logger.info(
            "rq_vae epoch %d/%d loss %.5f recon %.5f commit %.5f diversity %.4f utilisation %s%s",
            epoch + 1, params.epochs, record["loss"], record["reconstruction"], record["commitment"],
            record["diversity"], " ".join(f"{u:.2f}" for u in record["utilisation_per_level"]),
            f" reset {record['dead_codes_reset']}" if params.dead_code_reset else "",
        )
    codes = model.encode(x).numpy().astype(np.int64)
    logger.info(
        "rq_vae final pass: utilisation %s, unique %.4f",
        " ".join(f"{len(np.unique(codes[:, level])) / codebook_size:.2f}" for level in range(levels)),
        len(np.unique(codes, axis=0)) / len(codes),
    )
    return RQVAEResult(codes=codes, model=model, history=history)


def fit_rq_vae(embeddings: np.ndarray, levels: int, codebook_size: int, seed: int, **params: Any) -> np.ndarray:
    """RQ-VAE codes, int64 [items, levels]; `params` are the fields of `RQVAEParams` (all optional).

    >>> rng = np.random.default_rng(0)
    >>> fit_rq_vae(rng.normal(size=(64, 8)), levels=2, codebook_size=4, seed=0, epochs=2, hidden_dims=[16],
    ...            latent_dim=4, batch_size=32).shape
    (64, 2)
    """
    return train_rq_vae(embeddings, levels, codebook_size, seed, RQVAEParams.from_kwargs(**params)).codes


def default_params() -> dict[str, Any]:
    """The default keyword parameters, e.g. for a config section or a report."""
    return asdict(RQVAEParams())
