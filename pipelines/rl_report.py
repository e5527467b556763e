"""The RL stage's curves: reward, identity / kept-group / invalid rates and validation metrics per step, as a PNG."""

from __future__ import annotations

import io


def plot(history: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["reward_mean"] for r in history], label="reward")
    axes[0].plot(steps, [r["rank_reward_mean"] for r in history], label="rank reward")
    axes[1].plot(steps, [r["identity_rate"] for r in history], label="identity rate")
    axes[1].plot(steps, [r["kept_group_fraction"] for r in history], label="kept groups")
    axes[1].plot(steps, [r["invalid_rate"] for r in history], label="invalid rate")
    evals = [r for r in history if "val_ndcg@5" in r]
    axes[2].plot([r["step"] for r in evals], [r["val_ndcg@5"] for r in evals], marker="o", label="val N@5")
    axes[2].plot([r["step"] for r in evals], [r["val_recall@1"] for r in evals], marker="o", label="val R@1")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
