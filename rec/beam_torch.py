"""SID beam search on a plain torch causal LM: one prefill per prompt, then one batched forward per SID level.

`torch_beam_search` returns what `rec.beam.hf_beam_search` returns (per prompt, up to `top_n` distinct
(item_id, score), best first; scores are sums of full-vocabulary log-probabilities, or of per-level ones for a
model trained with `sid_softmax: level`, the trie mask applied after the log-softmax; excluded items removed at the
last level), without HF `generate`, which prefills every prompt once
per beam, and without one engine request per beam per level (the vLLM back-end, `rec.engines`).

How: the prompts are prefilled once each, left-padded, in groups of similar length (`prefill_groups`: little
padding), into one transformers `StaticCache`. The beams of a user are then not copies of its cache rows but extra
tokens of its one row (tree attention): level l feeds the `num_beams` codes chosen at level l-1 as `num_beams`
query tokens of the user's row, at the same position, with a 4-D attention mask that lets each beam token see the
prompt, its own ancestors and itself. So the forward of a level covers users x beams in one call, the prompt's keys
and values are stored once per user (never copied per beam, never reordered: pruned beams stay in the cache,
masked), and a forward is only run for levels 1..L-1 (the last level's codes need no forward). The LM head runs in
row chunks and keeps only the level's code columns of the log-softmax (`CodeLogprobs`). Trie nodes, masks and the
top-k stay on the model's device; the only host transfer is the final (leaf, score) table.

Speed: `bench/beam_search.py` (key `torch`). Tiny preset dims, 12,101 items, beam 20, batch 64, 1 thread on a
shared 2-core VM: ~0.4-0.5 s per batch against 3.4-4.3 s for the vLLM back-end on the same batches; the LM head
(64 x 20 rows x 9,218 tokens per level) is about half of it.

Ties: a user's candidates are ordered by score, then by (parent beam rank, code): a stable sort of the flattened
[beams, codes] table, the rule of the vLLM back-end. So on exact ties the lexicographically smallest SIDs win
(tests/test_beam_torch.py checks this on a model whose logits are all equal). HF's reference has no such rule: it
takes `torch.topk` of [beams, vocab] rows, and topk's order among equal values on CPU comes from its selection
algorithm (`torch.topk(torch.zeros(1, 20), 10)` gives indices 15, 11, 12, ...), so it depends on the row's length
and contents and differs on CUDA; it cannot be reproduced without building HF's exact tensors. Distinct SIDs of a
real model tie exactly only by accident; the parity tests allow swaps within 1e-4 (`assert_same_top_n`).

Memory, Qwen3-8B (36 layers, 8 KV heads x 128 head_dim, bf16, vocabulary 152,695) in the qwen3_8b preset
(pipelines/configs/qwen3_8b/prerank.yaml: batch_size B = 256 prompts, num_beams W = 20, 4 SID levels,
max_model_len 2048). KV cache: 36 x 8 x 128 x (K + V) x 2 B = 144 KiB per token. T is the batch's padded prompt
width, set by its longest prompt: Beauty test histories average 7.9 items (~73 prompt tokens), but the longest of
256 random users gives T ~ 470 (median; 720 at the 90th percentile; 2048 at most).
  - this search: B x (T + W x 3) tokens in one `StaticCache` allocated after the prefill (the beam tokens are
    written into it in place; a DynamicCache would copy it whole, 2x transient, at every level):
    256 x 530 x 144 KiB = 18.6 GiB at T = 470; 256 x 2,108 x 144 KiB = 74 GiB at T = 2048, more than a GPU holds
    next to the 15.3 GiB of weights. With long prompts use B <= 64 (18.5 GiB at T = 2048), or batch users of
    similar history length.
  - a cache expanded per beam (HF `generate`, or index_select/reorder_cache on the prefilled rows) holds
    B x W x (T + 3) tokens: 333 GiB at T = 470, 1.41 TiB at T = 2048, i.e. ~18x the above.
  - logits of a level: B x W = 5,120 rows x 152,695 = 782M values, 1.46 GiB in bf16 and 2.91 GiB as the float32
    the log-normaliser is taken in, if computed at once; the LM head runs over chunks of `HEAD_CHUNK_ELEMENTS`
    (2^28 values off CPU: 0.5 GiB bf16 + 1 GiB float32 per chunk, 3 chunks a level) and keeps only the 256 code
    columns (5 MiB). The prefill takes the head of the last position only.
  - prefill activations: at most `PREFILL_TOKENS` = 16,384 padded prompt tokens per forward; the MLP's gate, up
    and product (3 x 12,288 bf16 = 72 KiB per token, one layer at a time) peak at ~1.1 GiB.
  - attention: with a mask, transformers' sdpa repeats the 8 KV heads to the 32 query heads (`repeat_kv`), one
    layer at a time: 2 x 256 x 32 x 530 x 128 x 2 B = 2.1 GiB transient per level at T = 470.

The model is a Qwen3-style causal LM: `get_decoder()` gives the hidden states and `get_output_embeddings()` turns
them into logits with nothing else in between (no soft-capping, no sliding window), with `sdpa` or `eager` attention
(they take a custom 4-D mask; flash-attention kernels do not).

>>> import numpy as np
>>> from transformers import Qwen3Config, Qwen3ForCausalLM
>>> from rec.beam import SidDecoding, hf_beam_search
>>> from rec.sid.trie import SidTrie
>>> trie = SidTrie.build(np.array([[0, 1], [0, 2], [3, 1], [2, 0]]), np.array([10, 11, 12, 13]), codebook_size=4)
>>> decoding = SidDecoding(trie, torch.arange(8).view(2, 4) + 20, sid_begin=5, vocab_size=32)
>>> _ = torch.manual_seed(0)
>>> model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, head_dim=16)).eval()
>>> prompts, exclude = [[1, 2, 3], [4]], [[12], []]
>>> found = torch_beam_search(model, decoding, prompts, num_beams=3, top_n=3, exclude=exclude)
>>> [[item for item, _ in row] for row in found] == [[item for item, _ in row] for row in
...     hf_beam_search(model, decoding, prompts, num_beams=3, top_n=3, exclude=exclude)]
True
>>> 12 in [item for item, _ in found[0]]
False
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec.beam import SidDecoding, check_beam_args, left_pad

NEG_INF = float("-inf")


# Logit values per chunk of the LM head (rows x vocabulary): on CPU ~4 MiB, the chunk stays in cache between the
# matmul and the log-normaliser (~1.4x faster than one [rows, vocab] pass on the tiny preset); elsewhere it only
# bounds memory.
HEAD_CHUNK_ELEMENTS = {"cpu": 2**20}
HEAD_CHUNK_ELEMENTS_DEFAULT = 2**28
# Prompt tokens per prefill forward: bounds the prefill's activations (see the memory note above).
PREFILL_TOKENS = 16384
# A prefill group's prompts are at least this fraction of its longest: at most 1/4 of its tokens are padding.
PREFILL_FILL = 0.75


def prefill_groups(lengths: Sequence[int], max_tokens: int = PREFILL_TOKENS,
                   fill: float = PREFILL_FILL) -> list[tuple[int, int]]:
    """[start, stop) slices of `lengths` (sorted longest first) to prefill together: similar lengths, so that
    little of a forward is padding (a batch of Beauty prompts runs from ~30 to 256 tokens: padded to the longest,
    ~80 % of one batch's prefill would be padding), and at most `max_tokens` padded tokens per group.

    >>> prefill_groups([200, 190, 160, 100, 90, 40, 40, 39])
    [(0, 3), (3, 5), (5, 8)]
    >>> prefill_groups([10] * 5, max_tokens=20)
    [(0, 2), (2, 4), (4, 5)]
    """
    groups, start = [], 0
    for index in range(1, len(lengths) + 1):
        if index == len(lengths) or lengths[index] < fill * lengths[start] or \
                (index - start + 1) * lengths[start] > max_tokens:
            groups.append((start, index))
            start = index
    return groups


class CodeLogprobs:
    """The model's LM head as full-vocabulary log-softmax values taken at one level's code columns only (float32),
    run over chunks of rows (`HEAD_CHUNK_ELEMENTS`) so that no [rows, vocab] float32 tensor is ever whole. With
    `over_level` (a model whose `sid_softmax` is `level`) the softmax is over the level's codes: the head then only
    computes those codebook_size columns."""

    def __init__(self, head: torch.nn.Module, over_level: bool = False):
        self.over_level = over_level
        if not isinstance(head, torch.nn.Linear):
            raise TypeError(f"torch_beam_search expects a linear LM head, got {type(head).__name__}")
        weight = head.weight
        # MKL's CPU GEMM is ~1.3x faster with the [hidden, vocab] operand contiguous; on a GPU the view is as fast
        self.weight_t = weight.t().contiguous() if weight.device.type == "cpu" else weight.t()
        self.bias = head.bias
        self.chunk = max(1, HEAD_CHUNK_ELEMENTS.get(weight.device.type, HEAD_CHUNK_ELEMENTS_DEFAULT) // weight.shape[0])
        # float32 logits go straight into one reused buffer; other dtypes are upcast per chunk (as HF does)
        self.buffer = (torch.empty(self.chunk, weight.shape[0], dtype=torch.float32, device=weight.device)
                       if weight.dtype == torch.float32 else None)

    def __call__(self, hidden: torch.Tensor, columns: slice | torch.Tensor) -> torch.Tensor:
        if self.over_level:
            logits = hidden.float() @ self.weight_t[:, columns].float()
            if self.bias is not None:
                logits += self.bias[columns].float()
            return torch.log_softmax(logits, dim=-1)
        rows = hidden.reshape(-1, hidden.shape[-1])
        width = columns.stop - columns.start if isinstance(columns, slice) else len(columns)
        out = torch.empty(rows.shape[0], width, dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], self.chunk):
            block = rows[start:start + self.chunk]
            if self.buffer is not None:
                logits = torch.mm(block, self.weight_t, out=self.buffer[: len(block)])
            else:
                logits = torch.mm(block, self.weight_t).float()
            if self.bias is not None:
                logits += self.bias
            peak = logits.amax(dim=-1, keepdim=True)
            codes = logits[:, columns] - peak
            # log-sum-exp in place: the chunk is overwritten once its code columns are copied out
            log_norm = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True).log_()
            torch.sub(codes, log_norm, out=out[start:start + len(block)])
        return out.view(*hidden.shape[:-1], width)


def prefill(model, prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device, extra_tokens: int):
    """(cache, last-position hidden states [users, 1, hidden_size], attention mask [users, width]) of `prompts`
    (longest first), left-padded to the longest and each computed once, in `prefill_groups`.

    The groups are merged into one `StaticCache` with room for `extra_tokens` more columns: the beam tokens are
    written into it in place, where a DynamicCache would copy the whole cache once per level.
    """
    from transformers import StaticCache

    decoder = model.get_decoder()
    width = len(prompts[0])
    groups, hidden = [], []
    for start, stop in prefill_groups([len(p) for p in prompts]):
        input_ids, attention_mask = left_pad(prompts[start:stop], pad_id)
        attention_mask = attention_mask.to(device)
        out = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask,
                      position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
        groups.append((out.past_key_values, width - input_ids.shape[1]))
        hidden.append(out.last_hidden_state[:, -1:])
    _, attention_mask = left_pad(prompts, pad_id)
    cache = StaticCache(config=model.config, max_cache_len=width + extra_tokens)
    pad = torch.nn.functional.pad
    for index in range(len(groups[0][0].layers)):
        # padding on the left of the time axis: masked columns, like the rows left_pad pads
        keys = torch.cat([pad(g.layers[index].keys, (0, 0, missing, 0)) for g, missing in groups])
        values = torch.cat([pad(g.layers[index].values, (0, 0, missing, 0)) for g, missing in groups])
        for g, _ in groups:  # layer by layer, so that the prompts' keys and values are held about once
            g.layers[index].keys = g.layers[index].values = None
        cache.update(keys, values, index)
        del keys, values
    return cache, torch.cat(hidden), attention_mask.to(device)


def _columns(ids: torch.Tensor) -> slice | torch.Tensor:
    """A level's code token ids as a slice when consecutive (a view of the logits, not a gather)."""
    first = int(ids[0])
    if torch.equal(ids.cpu(), torch.arange(first, first + len(ids))):
        return slice(first, first + len(ids))
    return ids


@torch.inference_mode()
def torch_beam_search(
    model,
    decoding: SidDecoding,
    prompts: Sequence[Sequence[int]],
    num_beams: int,
    top_n: int,
    exclude: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
) -> list[list[tuple[int, float]]]:
    """Constrained beam search, one prefill per prompt: per prompt, up to `top_n` distinct (item_id, score), best
    first; the arguments and answers of `rec.beam.hf_beam_search`. Runs the prompts as one batch on the model's
    device and dtype."""
    check_beam_args(num_beams, top_n)
    if not prompts:
        return []
    if exclude is not None and len(exclude) != len(prompts):
        raise ValueError(f"exclude has {len(exclude)} rows for {len(prompts)} prompts")
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        raise ValueError(
            f"torch_beam_search needs a custom 4-D attention mask, which attn_implementation={attention!r} does not "
            "take; load the model with attn_implementation='sdpa' (or 'eager')"
        )
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "use_sliding_window", False):
        raise ValueError("torch_beam_search computes logits as get_output_embeddings()(hidden) with full attention; "
                         "this model soft-caps its logits or uses a sliding window: use rec.beam.hf_beam_search")
    device = next(model.parameters()).device
    trie = decoding.trie
    children = trie.children.to(device)
    num_internal, codebook, levels = trie.num_internal, decoding.codebook_size, decoding.levels
    code_tokens = decoding.code_token_ids.to(device)
    columns = [_columns(ids) for ids in decoding.code_token_ids]
    columns = [c.to(device) if isinstance(c, torch.Tensor) else c for c in columns]
    excluded = decoding.excluded_leaves(exclude).to(device) if exclude is not None else None

    # longest prompt first, so that prefill groups are slices; results go back to the caller's order at the end
    prompt_ids = [decoding.prompt_ids(p) for p in prompts]
    order = sorted(range(len(prompt_ids)), key=lambda row: -len(prompt_ids[row]))
    if excluded is not None:
        excluded = excluded[torch.tensor(order, device=device)]
    cache, hidden, attention_mask = prefill(model, [prompt_ids[row] for row in order], pad_id, device,
                                            extra_tokens=num_beams * (levels - 1))
    decoder, code_logprobs = model.get_decoder(), CodeLogprobs(model.get_output_embeddings(),
                                                             over_level=decoding.sid_softmax == "level")
    users, prompt_width = attention_mask.shape
    cache_width = prompt_width + num_beams * (levels - 1)
    user_index = torch.arange(users, device=device)
    first_code_position = attention_mask.sum(1)  # the prompt occupies positions 0 .. len - 1
    prompt_visible = attention_mask.bool()[:, None, :]  # [users, 1, prompt_width]
    mask_dtype = model.dtype  # an additive mask must match the attention's query dtype
    blocked = torch.finfo(mask_dtype).min

    nodes = torch.zeros(users, 1, dtype=torch.long, device=device)  # one root beam per user
    scores = torch.zeros(users, 1, dtype=torch.float32, device=device)
    # ancestors[u, b, c]: beam-token column c of the cache (after the prompt) is an ancestor of beam b
    ancestors = torch.zeros(users, 1, 0, dtype=torch.bool, device=device)
    codes = None
    for level in range(levels):
        if level > 0:
            width = codes.shape[1]
            written = prompt_width + ancestors.shape[2] + width  # the static cache's later columns are still empty
            visible = torch.cat([prompt_visible.expand(users, width, prompt_width), ancestors,
                                 torch.eye(width, dtype=torch.bool, device=device).expand(users, width, width),
                                 torch.zeros(users, width, cache_width - written, dtype=torch.bool, device=device)],
                                dim=2)
            mask = torch.zeros(visible.shape, dtype=mask_dtype, device=device).masked_fill_(~visible, blocked)
            hidden = decoder(input_ids=code_tokens[level - 1][codes], attention_mask=mask[:, None],
                             position_ids=(first_code_position + level - 1)[:, None].expand(users, width),
                             past_key_values=cache, use_cache=True).last_hidden_state  # [users, beams, hidden]
        logprobs = code_logprobs(hidden, columns[level])  # [users, beams, codebook]
        child = children[nodes.clamp(min=0)].long()  # [users, beams, codebook]; -1 where no child
        allowed = (child >= 0) & (nodes >= 0)[..., None]
        if excluded is not None and level == levels - 1:
            allowed &= ~excluded[user_index[:, None, None], (child - num_internal).clamp(min=0)]
        candidates = torch.where(allowed, scores[..., None] + logprobs, NEG_INF).flatten(1)
        keep = min(num_beams, candidates.shape[1])
        # stable: equal scores keep (parent rank, code) order (see the module docstring on ties)
        scores, index = torch.sort(candidates, dim=1, descending=True, stable=True)
        scores, index = scores[:, :keep], index[:, :keep]
        parents, codes = index // codebook, index % codebook
        nodes = torch.where(torch.isfinite(scores), child.flatten(1).gather(1, index), -1)
        if 0 < level < levels - 1:
            beams_before = ancestors.shape[1]
            ancestors = torch.cat([ancestors[user_index[:, None], parents],
                                   torch.nn.functional.one_hot(parents, beams_before).bool()], dim=2)
        elif level == 0:
            ancestors = torch.zeros(users, keep, 0, dtype=torch.bool, device=device)

    leaf_items = trie.leaf_item_ids
    results: list[list[tuple[int, float]]] = [[] for _ in prompts]
    for row, row_nodes, row_scores in zip(order, nodes.cpu().tolist(), scores.cpu().tolist()):
        found = [(int(leaf_items[node - num_internal]), score)
                 for node, score in zip(row_nodes, row_scores) if node >= num_internal and score != NEG_INF]
        results[row] = found[:top_n]
    return results
