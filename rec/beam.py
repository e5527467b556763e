"""Beam search constrained to valid semantic IDs: the trie constraint, the HF back-end, and result handling.

The pre-ranker decodes one SID after the next-item prompt (`rec.midtrain_data.next_item_prompt_ids`): the prompt
always continues with `<|sid_begin|>`, so that token is appended to the prompt (it is forced and adds the same
log-probability to every beam of a prompt, so the ranking is unchanged) and the search generates exactly one code
token per level. `<|sid_end|>` is never generated: after the last level the SID is complete.

Scores are sums of the model's log-probabilities over the full vocabulary (the mask is applied after the
log-softmax, as HF beam search does, and vLLM's default `raw_logprobs` mode reports the same numbers), i.e. the
log-probability of the item's SID under the model. A model mid-trained with `sid_softmax: level` (its config.json
says so; `rec.model.sid_softmax_of`) was trained to score a level's codes against that level's codes only, so its
search normalises each level's log-softmax over the level's codes (`SidDecoding.sid_softmax`), in every
back-end. History items can be excluded at the last level, so the beam is not spent on items the user already has.

`SidDecoding` holds every table the constraint needs as tensors (trie children, token -> (level, code)); the HF
logits processor recomputes each beam's trie node from its generated tokens with one gather per level, so there is
no Python lookup per beam per step, and beams reordered by the search cannot get out of step with their node.

>>> import numpy as np
>>> from rec.sid.trie import SidTrie
>>> trie = SidTrie.build(np.array([[0, 1], [0, 2], [3, 1]]), np.array([10, 11, 12]), codebook_size=4)
>>> decoding = SidDecoding(trie, torch.arange(8).view(2, 4) + 100, sid_begin=99, vocab_size=110)
>>> decoding.walk(torch.tensor([[100], [103], [101]])).tolist()   # code 0 -> node 1, code 3 -> node 2, 1: none
[1, 2, -1]
>>> decoding.allowed_codes(torch.tensor([1]), level=1).int().tolist()
[[0, 1, 1, 0]]
>>> top_items(trie, torch.tensor([3, 5, 4]), torch.tensor([-2.0, -1.0, float("-inf")]), top_n=5)
[(12, -1.0), (10, -2.0)]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LogitsProcessor

from rec.sid.trie import SidTrie

NEG_INF = float("-inf")
# HF starts all but the first beam of a prompt at -1e9; anything this low is a beam that never held a real SID.
DEAD_SCORE = -1e8


class SidDecoding:
    """The trie of catalogue SIDs plus the token ids of its codes, as tensors for vectorised decoding."""

    def __init__(self, trie: SidTrie, code_token_ids: torch.Tensor, sid_begin: int, vocab_size: int,
                 sid_softmax: str = "vocab"):
        from rec.model import SidCodeTables, check_sid_softmax

        self.sid_softmax = check_sid_softmax(sid_softmax)
        levels, codebook_size = code_token_ids.shape
        if levels != trie.depth or codebook_size != trie.codebook_size:
            raise ValueError(
                f"SID tokens are [{levels}, {codebook_size}] but the trie has depth {trie.depth} and codebook "
                f"{trie.codebook_size}; build both from the same sid/sid_map.parquet and sid/report.json"
            )
        self.trie = trie
        self.code_token_ids = code_token_ids.long()
        self.sid_begin = int(sid_begin)
        self.levels = int(levels)
        self.codebook_size = int(codebook_size)
        # token id -> its code and level (-1 for every token that is not a SID code)
        tables = SidCodeTables.of(self.code_token_ids, vocab_size)
        self.token_code, self.token_level = tables.code, tables.level
        self.leaf_of_item = {int(item): leaf for leaf, item in enumerate(trie.leaf_item_ids.tolist())}
        self._children_np = trie.children.numpy()
        self._leaf_items_np = trie.leaf_item_ids.numpy()

    @classmethod
    def from_tokenizer(cls, tokenizer, trie: SidTrie, sid_softmax: str = "vocab") -> SidDecoding:
        from rec.model import sid_token_ids, token_id
        from rec.sid.codes import SID_BEGIN

        return cls(trie, sid_token_ids(tokenizer, trie.depth, trie.codebook_size), token_id(tokenizer, SID_BEGIN),
                   len(tokenizer), sid_softmax)

    @classmethod
    def from_sid_map(cls, tokenizer, item_ids: Sequence[int], codes: np.ndarray, codebook_size: int,
                     sid_softmax: str = "vocab") -> SidDecoding:
        """From the columns of sid/sid_map.parquet (every level, the disambiguation level included)."""
        trie = SidTrie.build(np.asarray(codes, dtype=np.int64), np.asarray(item_ids, dtype=np.int64), codebook_size)
        return cls.from_tokenizer(tokenizer, trie, sid_softmax)

    def prompt_ids(self, prompt: Sequence[int]) -> list[int]:
        """The prompt the search continues: `prompt` ending with `<|sid_begin|>` (appended when missing)."""
        ids = list(prompt)
        return ids if ids and ids[-1] == self.sid_begin else ids + [self.sid_begin]

    def walk(self, generated: torch.Tensor) -> torch.Tensor:
        """Trie node reached by each row of generated code tokens [rows, depth]; -1 where a token is off the trie."""
        nodes = torch.zeros(generated.shape[0], dtype=torch.long)
        # ids past the tokenizer (a model's padded vocabulary rows) are never SID codes
        tokens_all = generated.clamp(min=0, max=len(self.token_code) - 1)
        in_vocab = generated == tokens_all
        for level in range(generated.shape[1]):
            tokens = tokens_all[:, level]
            codes = self.token_code[tokens]
            ok = in_vocab[:, level] & (nodes >= 0) & (codes >= 0) & (self.token_level[tokens] == level)
            # gather at a safe index, then mark the rows that were not valid
            nxt = self.trie.children[nodes.clamp(min=0, max=self.trie.num_internal - 1), codes.clamp(min=0)].long()
            nodes = torch.where(ok, nxt, torch.full_like(nxt, -1))
        return nodes

    def allowed_codes(
        self,
        nodes: torch.Tensor,
        level: int,
        excluded_leaves: torch.Tensor | None = None,
        prompt_of_row: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[rows, codebook_size] bool: codes allowed after each node (all False for -1 nodes).

        `excluded_leaves` [prompts, num_leaves] bool removes leaves (items) at the last level; row r belongs to
        prompt `prompt_of_row[r]` (default: row r is prompt r).
        """
        live = (nodes >= 0) & (nodes < self.trie.num_internal)
        children = self.trie.children[nodes.clamp(min=0, max=self.trie.num_internal - 1)].long()
        allowed = (children >= 0) & live[:, None]
        if excluded_leaves is not None and level == self.levels - 1:
            leaf = (children - self.trie.num_internal).clamp(min=0)
            prompts = torch.arange(len(nodes)) if prompt_of_row is None else prompt_of_row
            allowed &= ~excluded_leaves[prompts[:, None], leaf]
        return allowed

    def excluded_leaves(self, exclude: Sequence[Sequence[int]]) -> torch.Tensor:
        """[rows, num_leaves] bool: the leaves of each row's items to exclude (items without a SID are ignored)."""
        mask = torch.zeros(len(exclude), len(self.trie.leaf_item_ids), dtype=torch.bool)
        for row, items in enumerate(exclude):
            leaves = [self.leaf_of_item[int(i)] for i in items if int(i) in self.leaf_of_item]
            if leaves:
                mask[row, leaves] = True
        return mask

    def children_of(self, node: int, level: int, excluded: set[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(codes, child nodes) allowed after one node (for Python-driven engines); excluded items at the last level."""
        row = self._children_np[node]
        codes = np.flatnonzero(row >= 0)
        nodes = row[codes].astype(np.int64)
        if excluded and level == self.levels - 1:
            items = self._leaf_items_np[nodes - self.trie.num_internal]
            keep = ~np.isin(items, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
            codes, nodes = codes[keep], nodes[keep]
        return codes, nodes


class SidTrieLogitsProcessor(LogitsProcessor):
    """HF logits processor: every token but the SID codes the trie allows after each beam's prefix gets -inf.

    `prompt_len` is the (padded) prompt width: generated tokens start there. `excluded_leaves` [batch, num_leaves]
    is per prompt; HF lays beams out prompt-major (row r is beam r % num_beams of prompt r // num_beams).
    """

    def __init__(
        self, decoding: SidDecoding, prompt_len: int, num_beams: int, excluded_leaves: torch.Tensor | None = None
    ):
        self.decoding = decoding
        self.prompt_len = prompt_len
        self.excluded = excluded_leaves
        self.num_beams = num_beams
        # a level's code tokens are usually consecutive ids (added in order): a slice is a view, not a gather
        self.columns: list[slice | torch.Tensor] = []
        for ids in decoding.code_token_ids:
            first = int(ids[0])
            consecutive = torch.equal(ids, torch.arange(first, first + len(ids)))
            self.columns.append(slice(first, first + len(ids)) if consecutive else ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        level = input_ids.shape[1] - self.prompt_len
        if level >= self.decoding.levels:  # past the last level: nothing is allowed (the search stops before this)
            return scores.fill_(NEG_INF)
        nodes = self.decoding.walk(input_ids[:, self.prompt_len:].cpu())
        prompt_of_row = torch.arange(len(nodes)) // self.num_beams
        allowed = self.decoding.allowed_codes(nodes, level, self.excluded, prompt_of_row).to(scores.device)
        columns = self.columns[level]
        if isinstance(columns, torch.Tensor):
            columns = columns.to(scores.device)
        level_scores = scores[:, columns]
        if self.decoding.sid_softmax == "level":  # the level's codes renormalised among themselves
            level_scores = level_scores - torch.logsumexp(level_scores, dim=-1, keepdim=True)
        kept = torch.where(allowed, level_scores, NEG_INF)
        # in place: `scores` is this step's fresh log-softmax, and a second [beams, vocab] tensor would cost as much
        # as everything else here together
        scores.fill_(NEG_INF)
        scores[:, columns] = kept
        return scores


def top_items(trie: SidTrie, leaves: torch.Tensor, scores: torch.Tensor, top_n: int) -> list[tuple[int, float]]:
    """Distinct items of the finished beams, best score first, at most `top_n`; dead or off-trie beams dropped."""
    leaves, scores = leaves.flatten().long(), scores.flatten().float()
    is_leaf = (leaves >= trie.num_internal) & (leaves < trie.num_internal + len(trie.leaf_item_ids))
    keep = is_leaf & torch.isfinite(scores) & (scores > DEAD_SCORE)
    leaves, scores = leaves[keep], scores[keep]
    order = torch.sort(scores, descending=True, stable=True).indices
    seen: set[int] = set()
    result = []
    for leaf, score in zip(leaves[order].tolist(), scores[order].tolist()):
        item = int(trie.leaf_item_ids[leaf - trie.num_internal])
        if item not in seen:
            seen.add(item)
            result.append((item, float(score)))
            if len(result) == top_n:
                break
    return result


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of prompts padded on the left, as decoder-only generation needs."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def check_beam_args(num_beams: int, top_n: int) -> None:
    if top_n < 1 or num_beams < top_n:
        raise ValueError(f"need 1 <= top_n <= num_beams; got top_n={top_n}, num_beams={num_beams}")


@torch.inference_mode()
def hf_beam_search(
    model,
    decoding: SidDecoding,
    prompts: Sequence[Sequence[int]],
    num_beams: int,
    top_n: int,
    exclude: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
    processor_cls: type[LogitsProcessor] = SidTrieLogitsProcessor,
) -> list[list[tuple[int, float]]]:
    """Constrained beam search with HF `generate`: per prompt, up to `top_n` distinct (item_id, score), best first.

    `prompts` are token ids (`next_item_prompt_ids`; `<|sid_begin|>` is appended when missing); `exclude` gives
    per prompt the items that may not be returned (e.g. the history). Runs the prompts as one batch.
    `processor_cls` exists for the benchmark, which swaps in a per-beam Python implementation.
    """
    check_beam_args(num_beams, top_n)
    if not prompts:
        return []
    if exclude is not None and len(exclude) != len(prompts):
        raise ValueError(f"exclude has {len(exclude)} rows for {len(prompts)} prompts")
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad([decoding.prompt_ids(p) for p in prompts], pad_id)
    excluded = decoding.excluded_leaves(exclude) if exclude is not None else None
    processor = processor_cls(decoding, input_ids.shape[1], num_beams, excluded)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        num_beams=num_beams,
        num_return_sequences=num_beams,
        max_new_tokens=decoding.levels,
        min_new_tokens=decoding.levels,
        do_sample=False,
        length_penalty=0.0,  # scores are plain sums of log-probabilities (every SID has the same length)
        early_stopping=True,
        logits_processor=[processor],
        return_dict_in_generate=True,
        output_scores=True,
        pad_token_id=pad_id,
    )
    generated = out.sequences[:, input_ids.shape[1]:].cpu()
    if generated.shape[1] != decoding.levels:
        raise RuntimeError(f"beam search generated {generated.shape[1]} tokens, expected {decoding.levels}")
    leaves = decoding.walk(generated).view(len(prompts), num_beams)
    scores = out.sequences_scores.float().cpu().view(len(prompts), num_beams)
    return [top_items(decoding.trie, leaves[row], scores[row], top_n) for row in range(len(prompts))]
