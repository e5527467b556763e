"""RQ-VAE quantiser (rec/sid/rq_vae.py) on synthetic clustered data: shapes, determinism, anti-collapse, learning."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rec.sid.quantize import QUANTIZERS
from rec.sid.rq_vae import RQVAEParams, ResidualQuantizer, default_params, fit_rq_vae, train_rq_vae

LEVELS, CODEBOOK_SIZE = 2, 32
SMALL = dict(hidden_dims=(64,), latent_dim=8, epochs=10, batch_size=256)
# Everything the paper uses against codebook collapse, switched off; codebooks start in the tiny VQ-VAE box.
PLAIN = dict(ema=False, dead_code_reset=False, kmeans_init=False, diversity_weight=0.0)


@pytest.fixture(scope="module")
def clustered() -> np.ndarray:
    """2,000 points around 64 Gaussian centres in 32 dimensions."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 32))
    return (centres[rng.integers(0, 64, 2000)] + 0.3 * rng.normal(size=(2000, 32))).astype(np.float32)


def utilisation(codes: np.ndarray) -> list[float]:
    return [len(np.unique(codes[:, level])) / CODEBOOK_SIZE for level in range(codes.shape[1])]


def test_codes_shape_dtype_range(clustered):
    codes = fit_rq_vae(clustered, levels=3, codebook_size=16, seed=0, **{**SMALL, "epochs": 2})
    assert codes.shape == (len(clustered), 3)
    assert codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 16


def test_same_seed_same_codes_and_caller_rng_untouched(clustered):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=7, **{**SMALL, "epochs": 3})
    assert torch.equal(torch.rand(1), expected_next)  # the fit forked the global RNG instead of reseeding it
    second = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=7, **{**SMALL, "epochs": 3})
    other_seed = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=8, **{**SMALL, "epochs": 3})
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other_seed)


def test_same_codes_in_another_process_and_thread_count_restored(clustered, tmp_path):
    threads = torch.get_num_threads()
    params = {**SMALL, "epochs": 3}
    here = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=3, **params)
    assert torch.get_num_threads() == threads
    np.save(tmp_path / "x.npy", clustered)
    script = textwrap.dedent(f"""
        import numpy as np
        from rec.sid.rq_vae import fit_rq_vae
        codes = fit_rq_vae(np.load({str(tmp_path / "x.npy")!r}), {LEVELS}, {CODEBOOK_SIZE}, seed=3, **{params!r})
        np.save({str(tmp_path / "codes.npy")!r}, codes)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=Path(__file__).parents[1])
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), here)


def test_ema_and_dead_code_reset_beat_a_collapsed_plain_run(clustered):
    plain = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=0, **SMALL, **PLAIN)
    fixes = {**PLAIN, "ema": True, "dead_code_reset": True}
    fixed = fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=0, **SMALL, **fixes)
    plain_use, fixed_use = utilisation(plain), utilisation(fixed)
    assert min(fixed_use) >= 0.9, fixed_use
    assert max(plain_use) < 0.85, plain_use  # the bad init really does collapse without the fixes
    assert len(np.unique(fixed, axis=0)) > 1.5 * len(np.unique(plain, axis=0))


@pytest.mark.parametrize("ema", [False, True])
def test_reconstruction_loss_falls(clustered, ema):
    params = RQVAEParams(**{**SMALL, "lr": 3e-3, "ema": ema})
    result = train_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=0, params=params)
    first, last = result.history[0]["reconstruction"], result.history[-1]["reconstruction"]
    assert last < 0.7 * first, (first, last)
    assert all(np.isfinite(record["loss"]) for record in result.history)


def test_dead_code_reset_reseeds_only_unused_codes_from_residuals():
    quantizer = ResidualQuantizer(levels=1, codebook_size=4, dim=2, ema=True, ema_decay=0.9, ema_epsilon=1e-5)
    quantizer.train()
    residuals = torch.tensor([[5.0, 5.0], [5.1, 5.0], [4.9, 5.0]])
    before = quantizer.codebooks.detach().clone()
    _, codes, _ = quantizer(residuals)
    used = set(codes[:, 0].tolist())
    resets = quantizer.reset_dead_codes(threshold=1.0, generator=torch.Generator().manual_seed(0))
    assert resets == [4 - len(used)]
    for code in range(4):
        vector = quantizer.codebooks[0, code]
        if code in used:  # EMA moved it a step towards its residuals, but it was not re-seeded
            assert not any(torch.equal(vector, r) for r in residuals)
        else:
            assert any(torch.equal(vector, r) for r in residuals)
            assert torch.equal(quantizer.ema_sums[0, code], vector)  # EMA state agrees with the new code
    assert not torch.equal(before, quantizer.codebooks.detach())
    assert quantizer.usage.sum() == 0


def test_ema_moves_a_code_to_the_mean_of_its_residuals():
    quantizer = ResidualQuantizer(levels=1, codebook_size=2, dim=2, ema=True, ema_decay=0.5, ema_epsilon=1e-5)
    quantizer.set_codebook(0, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]))
    quantizer.train()
    for _ in range(30):
        quantizer(torch.tensor([[3.0, 1.0], [1.0, 3.0]]))
    np.testing.assert_allclose(quantizer.codebooks[0, 0].detach().numpy(), [2.0, 2.0], atol=1e-3)


def test_registry_and_params(clustered):
    codes = QUANTIZERS["rq_vae"](clustered, LEVELS, CODEBOOK_SIZE, seed=0, **{**SMALL, "epochs": 1})
    assert codes.shape == (len(clustered), LEVELS)
    assert set(default_params()) >= {"latent_dim", "ema", "dead_code_reset", "diversity_weight", "kmeans_init"}
    with pytest.raises(TypeError, match="unknown rq_vae parameter"):
        fit_rq_vae(clustered, LEVELS, CODEBOOK_SIZE, seed=0, ema_decy=0.9)
    with pytest.raises(ValueError, match="ema_decay"):
        RQVAEParams(ema_decay=1.5)
