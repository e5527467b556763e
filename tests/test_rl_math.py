"""RL maths (pure): rewards, group advantages, the DAPO loss, overlong shaping and dynamic sampling."""

from __future__ import annotations

import pytest
import torch

from rec.rl import (
    DapoLossConfig,
    DynamicBatch,
    DynamicSamplingError,
    conditional_reward,
    dapo_loss,
    group_advantages,
    informative_groups,
    overlong_penalty,
    reward_fn,
    score_sample,
    unconditional_reward,
)


@pytest.mark.parametrize("pre, post, valid, conditional, unconditional", [
    (4, 1, True, 0.3 + 0.1, 0.3 + 0.1),   # moved up: rank gain + format bonus in both
    (4, 4, True, 0.0, 0.1),               # copied the input order: only the plain sum pays
    (0, 0, True, 0.1, 0.1),               # first and kept first: bonus
    (1, 5, True, -0.4, -0.3),             # moved down
    (2, 2, False, 0.0, 0.0),              # invalid answer falls back to the input order: no bonus either way
])
def test_conditional_reward_pays_the_format_bonus_only_for_improvements(pre, post, valid, conditional, unconditional):
    assert conditional_reward(pre, post, 10, valid, alpha=0.1) == pytest.approx(conditional)
    assert unconditional_reward(pre, post, 10, valid, alpha=0.1) == pytest.approx(unconditional)
    assert reward_fn("conditional") is conditional_reward
    with pytest.raises(ValueError, match="registered"):
        reward_fn("nope")


def test_an_answer_to_a_shuffled_prompt_is_scored_against_the_pre_rank_list():
    """Rollouts may show the candidates shuffled (prompt.shuffle_candidates): answers name SIDs and are read against
    the pre-rank list, so the reward is that of the ranking whatever order the prompt showed, an answer that copies
    the shown order is not an identity answer, and an invalid one falls back to the pre-rank order (R_rank 0)."""
    from rec.consistency import shuffled
    from rec.rerank import final_ranking, format_answer, parse_answer

    candidates, target = [7, 8, 9, 10, 11], 9  # pre = 2
    sids = [f"<|sid_begin|><s_a_{i}><|sid_end|>" for i in candidates]
    sid_of = dict(zip(candidates, sids))
    shown = shuffled(candidates, 0, 1)
    assert shown != candidates and shown.index(target) != 2

    def scored(text: str):
        ranking, reason = final_ranking(parse_answer(text, sids), candidates)
        return score_sample(ranking, reason is None, candidates, target, "conditional", 0.1)

    best = scored(format_answer("", [sid_of[i] for i in [9, 7, 8, 10, 11]]))
    assert (best.pre, best.post, best.identity) == (2, 0, False) and best.reward == pytest.approx(0.4 + 0.1)
    copied = scored(format_answer("", [sid_of[i] for i in shown]))
    assert not copied.identity and copied.post == shown.index(target)
    assert copied.rank_reward == pytest.approx((2 - shown.index(target)) / 5)
    invalid = scored("no answer")
    assert (invalid.valid, invalid.post, invalid.reward) == (False, 2, 0.0)


def test_group_advantages_and_informative_groups():
    rewards = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.0, 0.2, 0.4, 0.2]])
    advantages = group_advantages(rewards)
    assert torch.allclose(advantages[0], torch.zeros(4))
    assert torch.isclose(advantages[1].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.isclose(advantages[1].std(), torch.tensor(1.0), atol=1e-4)
    assert informative_groups(rewards).tolist() == [False, True]


def test_dapo_loss_clips_higher_above_than_below_and_averages_over_tokens():
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    cfg = DapoLossConfig(eps_low=0.2, eps_high=0.28)
    # ratio 1.5 on a positive advantage is clipped at 1.28; ratio 0.5 on a negative one at 0.8
    new = torch.log(torch.tensor([[1.5, 1.5, 1.5], [0.5, 9.0, 9.0]]))
    loss, stats = dapo_loss(new, old, torch.tensor([1.0, -1.0]), mask, cfg)
    expected = (-(1.28 * 3) + 0.8) / 4  # token-level mean over the 4 answer tokens; padding ignored
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(1.0) and stats["clip_high_fraction"] == pytest.approx(0.75)
    # unclipped region: the gradient is the advantage-weighted log-prob gradient
    logprobs = torch.zeros(1, 2, requires_grad=True)
    loss, _ = dapo_loss(logprobs, torch.zeros(1, 2), torch.tensor([2.0]), torch.ones(1, 2), cfg)
    loss.backward()
    assert logprobs.grad.tolist() == [[-1.0, -1.0]]


def test_overlong_shaping_is_linear_inside_the_buffer():
    assert [overlong_penalty(n, 100, 20, factor=0.5) for n in (50, 80, 95, 100, 130)] == [0.0, 0.0, -0.375, -0.5, -0.5]
    assert overlong_penalty(100, 100, 0) == 0.0


def test_dynamic_sampling_fills_the_batch_or_stops_with_advice():
    batch = DynamicBatch(target_groups=2, max_gen_batches=3)
    batch.add(["a", "b"], torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert batch.groups == ["b"] and not batch.full
    batch.add(["c"], torch.tensor([[0.0, 0.5]]))
    assert batch.full and batch.kept_fraction == pytest.approx(2 / 3)
    starved = DynamicBatch(target_groups=1, max_gen_batches=2)
    starved.add(["a"], torch.tensor([[0.0, 0.0]]))
    with pytest.raises(DynamicSamplingError, match="max_gen_batches"):
        starved.add(["b"], torch.tensor([[1.0, 1.0]]))


def test_constrained_log_probs_renormalise_over_the_allowed_tokens_and_have_finite_gradients():
    from rec.rl import completion_logprobs, policy_batch

    class Model(torch.nn.Module):  # logits depend only on a learned table: next-token logits = table[token]
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
            from types import SimpleNamespace

            return SimpleNamespace(logits=self.table[input_ids][:, -logits_to_keep:])

    model = Model()
    batch = policy_batch([[1, 2], [3]], [[4, 5], [2]], pad_id=0, loss_masks=[[1, 0], [1]],
                         choices=[{0: [4, 1, 3]}, {}])
    logprobs, _ = completion_logprobs(model, batch)
    table = torch.log_softmax(model.table, dim=-1)
    allowed = torch.logsumexp(table[2, [4, 1, 3]], dim=0)
    assert torch.allclose(logprobs[0, 0], table[2, 4] - allowed)  # renormalised over the three allowed tokens
    assert torch.allclose(logprobs[1, 0], table[3, 2])  # free choice: plain log-probability
    assert batch["completion_mask"].tolist() == [[1, 0], [1, 0]]  # the forced token carries no loss
    (logprobs * batch["completion_mask"]).sum().backward()
    assert torch.isfinite(model.table.grad).all()
