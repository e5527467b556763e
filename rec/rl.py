"""RL for the re-ranker: verifiable ranking rewards and the DAPO policy loss (pure functions, no Ray/vLLM).

Rewards (GR2): with `pre` the target's 0-based position in the incoming (pre-rank) list, `post` its position in
the model's final ranking (an unparseable answer falls back to the incoming order, so post = pre) and `n` the list
length,

    R_rank = (pre - post) / n,        R_fmt = 1 if the answer parsed into a permutation else 0,

and the **conditional** reward adds `alpha * R_fmt` only when the ranking improved (R_rank > 0) or the target was
first and stayed first; otherwise R = R_rank. The plain sum (`unconditional`) is kept for the ablation: it pays a
model for copying the incoming order, which is the reward hacking the paper reports. A prompt that lists the
candidates shuffled (the prompt section's `shuffle_candidates`) changes none of this: answers name candidates by SID
and are read against the pre-rank list, so `pre`, `post`, the fallback and the identity flag all refer to the
pre-rank order.

>>> conditional_reward(pre=3, post=0, n=10, valid=True, alpha=0.1)   # improved: rank gain + format bonus
0.4
>>> conditional_reward(pre=3, post=3, n=10, valid=True, alpha=0.1)   # copied the input order: no bonus
0.0
>>> unconditional_reward(pre=3, post=3, n=10, valid=True, alpha=0.1)  # ... which the plain sum rewards
0.1
>>> conditional_reward(pre=0, post=0, n=10, valid=True, alpha=0.1)
0.1

DAPO (Yu et al. 2025): group-normalised advantages over the G samples of a prompt, clip-higher (separate
`eps_low` / `eps_high`), a token-level loss averaged over every answer token in the batch, no KL term by default,
soft overlong shaping, and dynamic sampling (groups whose rewards are all equal carry no signal and are dropped;
generation continues until the batch is full or `max_gen_batches` is reached).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def rank_reward(pre: int, post: int, n: int) -> float:
    """(pre - post) / n: positive when the re-ranker moved the target up."""
    if n <= 0:
        raise ValueError(f"list length must be > 0, got {n}")
    return (pre - post) / n


def format_reward(valid: bool) -> float:
    return 1.0 if valid else 0.0


def conditional_reward(pre: int, post: int, n: int, valid: bool, alpha: float) -> float:
    """R_rank + alpha * R_fmt only when the ranking improved or kept the target first; else R_rank."""
    r_rank = rank_reward(pre, post, n)
    if r_rank > 0 or (pre == 0 and post == 0):
        return round(r_rank + alpha * format_reward(valid), 12)
    return r_rank


def unconditional_reward(pre: int, post: int, n: int, valid: bool, alpha: float) -> float:
    """R_rank + alpha * R_fmt always (the ablation that invites copying the input order)."""
    return round(rank_reward(pre, post, n) + alpha * format_reward(valid), 12)


REWARDS: dict[str, Callable[[int, int, int, bool, float], float]] = {
    "conditional": conditional_reward,
    "unconditional": unconditional_reward,
}


def reward_fn(name: str) -> Callable[[int, int, int, bool, float], float]:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}") from None


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer, then a linear ramp to -factor at max_length.

    >>> [overlong_penalty(n, 100, 20) for n in (80, 90, 100, 120)]
    [0.0, -0.5, -1.0, -1.0]
    """
    if buffer <= 0 or length <= max_length - buffer:
        return 0.0
    return -factor * min(1.0, (length - (max_length - buffer)) / buffer)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """[groups, G] rewards -> advantages normalised within each group (mean 0, unit std; 0 where all equal).

    >>> [[round(a, 4) for a in row] for row in group_advantages(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist()]
    [[0.7071, -0.7071], [0.0, 0.0]]
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std.nan_to_num(0.0) + eps)


def informative_groups(rewards: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """[groups] bool: groups whose rewards are not all equal (dynamic sampling keeps only these)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) > tol


@dataclass
class DapoLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0


def dapo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: DapoLossConfig = DapoLossConfig(),
    ref_logprobs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss over answer tokens, averaged over all answer tokens of the batch.

    logprobs / old_logprobs / ref_logprobs / mask: [sequences, tokens]; advantages: [sequences] (one per sample,
    shared by its tokens). Returns (loss, stats: clip fractions, mean ratio, approximate KL to the old policy).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None].to(logprobs.dtype)
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high) * advantage
    per_token = -torch.minimum(unclipped, clipped)
    if config.kl_coef and ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        per_token = per_token + config.kl_coef * (torch.exp(log_ratio) - log_ratio - 1)  # k3 estimator
    tokens = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum() / tokens
    with torch.no_grad():
        low = ((ratio < 1 - config.eps_low) & (advantage < 0)).to(mask.dtype)
        high = ((ratio > 1 + config.eps_high) & (advantage > 0)).to(mask.dtype)
        stats = {
            "clip_fraction": float(((low + high) * mask).sum() / tokens),
            "clip_high_fraction": float((high * mask).sum() / tokens),
            "ratio_mean": float((ratio * mask).sum() / tokens),
            "approx_kl": float(((old_logprobs - logprobs) * mask).sum() / tokens),
        }
    return loss, stats


class DynamicSamplingError(RuntimeError):
    """Generation batches ran out before enough informative groups were found."""


@dataclass
class DynamicBatch:
    """Collects informative groups (rewards not all equal) from successive generation batches.

    `add` takes one generation batch; `full` says when `target_groups` are collected. After `max_gen_batches`
    batches without filling up, `add` raises with what to change.
    """

    target_groups: int
    max_gen_batches: int
    groups: list = field(default_factory=list)
    generated_batches: int = 0
    seen_groups: int = 0

    @property
    def full(self) -> bool:
        return len(self.groups) >= self.target_groups

    def add(self, groups: Sequence, rewards: torch.Tensor) -> None:
        self.generated_batches += 1
        self.seen_groups += len(groups)
        keep = informative_groups(rewards)
        self.groups += [g for g, k in zip(groups, keep.tolist()) if k]
        if not self.full and self.generated_batches >= self.max_gen_batches:
            raise DynamicSamplingError(
                f"dynamic sampling: {len(self.groups)} of {self.target_groups} groups with differing rewards after "
                f"{self.generated_batches} generation batches ({self.seen_groups} groups seen; the others had equal "
                "rewards for every sample). Raise rl.max_gen_batches or samples_per_prompt, raise the sampling "
                "temperature, or lower rl.prompts_per_step."
            )

    @property
    def kept_fraction(self) -> float:
        return len(self.groups) / self.seen_groups if self.seen_groups else 0.0


@dataclass
class ScoredSample:
    """One sampled answer with its verifiable reward (the list's pre-rank order is the reference)."""

    reward: float
    rank_reward: float
    valid: bool
    identity: bool
    pre: int
    post: int


def score_sample(ranking: Sequence[int], valid: bool, candidates: Sequence[int], target: int, reward: str,
                 alpha: float, length: int = 0, max_length: int = 0, overlong_buffer: int = 0,
                 overlong_factor: float = 1.0) -> ScoredSample:
    """Reward of a final ranking (an invalid answer's ranking is the incoming order: post = pre).

    >>> s = score_sample([8, 7, 9], True, [7, 8, 9], target=8, reward="conditional", alpha=0.1)
    >>> round(s.reward, 4), s.pre, s.post, s.identity
    (0.4333, 1, 0, False)
    >>> score_sample([7, 8, 9], True, [7, 8, 9], target=8, reward="unconditional", alpha=0.1).identity
    True
    """
    n = len(candidates)
    pre, post = list(candidates).index(target), list(ranking).index(target)
    value = reward_fn(reward)(pre, post, n, valid, alpha)
    if max_length:
        value += overlong_penalty(length, max_length, overlong_buffer, overlong_factor)
    return ScoredSample(reward=value, rank_reward=rank_reward(pre, post, n), valid=valid,
                        identity=valid and list(ranking) == list(candidates), pre=pre, post=post)


def constrained_choices(constraint, completion_ids: Sequence[int]) -> tuple[list[int], dict[int, list[int]]]:
    """Replay a `rec.answer_constraint.RankingConstraint` over a completion sampled under it: per token, whether
    the model had a choice (1) or the token was forced (0), and for choices among a few tokens (which candidate
    comes next) those tokens. The policy's probability of a constrained answer is the product over its choices of
    p(token) / p(allowed set); forced tokens have probability 1 and carry no gradient. Free text (the explanation)
    is allowed nearly the whole vocabulary and is left unnormalised.

    >>> class Two:  # a toy constraint: token 5 forced, then a choice between 7 and 8, then anything
    ...     def allowed(self, out):
    ...         return [[5], [7, 8]][len(out)] if len(out) < 2 else None
    >>> constrained_choices(Two(), [5, 8, 1])
    ([0, 1, 1], {1: [7, 8]})
    """
    mask, choices = [], {}
    for position in range(len(completion_ids)):
        allowed = constraint.allowed(list(completion_ids[:position]))
        if isinstance(allowed, list) and len(allowed) == 1:
            mask.append(0)
            continue
        mask.append(1)
        if isinstance(allowed, list):
            choices[position] = [int(t) for t in allowed]
    return mask, choices


def policy_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
                 loss_masks: Sequence[Sequence[int]] | None = None,
                 choices: Sequence[dict[int, list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """Prompt + completion sequences for one forward pass: prompts left-padded to a common end, completions
    right-padded after it, so every completion token sits in the last `completion_ids.shape[1]` positions.
    `loss_masks` (per completion token, 0 = forced) and `choices` (position -> allowed tokens) come from
    `constrained_choices` for answers sampled under a constraint.

    >>> b = policy_batch([[1, 2], [3]], [[7], [8, 9]], pad_id=0)
    >>> b["input_ids"].tolist(), b["completion_mask"].tolist()
    ([[1, 2, 7, 0], [0, 3, 8, 9]], [[1, 0], [1, 1]])
    >>> b["position_ids"].tolist()
    [[0, 1, 2, 2], [0, 0, 1, 2]]
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need as many prompts as completions (>0), got {len(prompts)} and {len(completions)}")
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    rows, masks, comp, comp_mask = [], [], [], []
    for prompt, completion in zip(prompts, completions):
        left, right = width_p - len(prompt), width_c - len(completion)
        rows.append([pad_id] * left + list(prompt) + list(completion) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        comp.append(list(completion) + [pad_id] * right)
        comp_mask.append([1] * len(completion) + [0] * right)
    if loss_masks is not None:
        comp_mask = [[m * keep for m, keep in zip(row, list(lm) + [0] * (width_c - len(lm)))]
                     for row, lm in zip(comp_mask, loss_masks)]
    attention = torch.tensor(masks)
    batch = {"input_ids": torch.tensor(rows), "attention_mask": attention,
             "position_ids": (attention.cumsum(-1) - 1).clamp(min=0),
             "completion_ids": torch.tensor(comp), "completion_mask": torch.tensor(comp_mask)}
    if choices is not None and any(choices):
        width_k = max(len(ids) for row in choices for ids in row.values())
        choice_ids = torch.full((len(prompts), width_c, width_k), -1, dtype=torch.long)
        for r, row in enumerate(choices):
            for position, ids in row.items():
                choice_ids[r, int(position), : len(ids)] = torch.tensor(ids)
        batch["choice_ids"] = choice_ids
    return batch


def completion_logprobs(model, batch: dict[str, torch.Tensor], with_entropy: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[sequences, completion tokens] log-probabilities of the completion tokens under `model` (an HF causal LM
    or a DeepSpeed engine around one), and the policy's entropy at those positions when asked. Only the logits of
    the completion positions are computed (`logits_to_keep`)."""
    width = batch["completion_ids"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    if "choice_ids" in batch:  # renormalise over the allowed set where the constraint left a few tokens
        ids = batch["choice_ids"]
        has_choice = (ids >= 0).any(-1)
        # padding slots gather the chosen token and are pushed to -1e30 (finite: no NaN in the backward pass)
        safe = torch.where(ids >= 0, ids, batch["completion_ids"].unsqueeze(-1))
        allowed = log_probs.gather(-1, safe).masked_fill(ids < 0, -1e30)
        chosen = torch.where(has_choice, chosen - torch.logsumexp(allowed, dim=-1), chosen)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy
