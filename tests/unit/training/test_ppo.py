"""PPO's arithmetic against hand-computed cases, and its rollout/update loop on tiny models in-process."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from services.training.jobs import ppo_loop
from services.training.jobs.ppo_loss import (
    AdaptiveKL,
    gae,
    kl_per_token,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_matches_a_hand_computed_case() -> None:
    # gamma 1, lambda 0.5: delta_2 = 1 - 0.4 = 0.6; delta_1 = 0.4 - 0.2 = 0.2; delta_0 = 0.2 - 0.5 = -0.3
    # A_2 = 0.6, A_1 = 0.2 + 0.5 * 0.6 = 0.5, A_0 = -0.3 + 0.5 * 0.5 = -0.05; returns = A + V
    advantages, returns = gae(t([0, 0, 1]), t([0.5, 0.2, 0.4]), t([1, 1, 1]), gamma=1.0, lam=0.5)
    assert advantages.tolist()[0] == pytest.approx([-0.05, 0.5, 0.6])
    assert returns.tolist()[0] == pytest.approx([0.45, 0.7, 1.0])
    # The completion ended at token 1: what lies after it (a value of 9.9, a reward of 5) counts for nothing.
    # gamma 0.9, lambda 1: A_1 = 2 - 0.3 = 1.7; A_0 = (0.9 * 0.3 - 0.1) + 0.9 * 1.7 = 1.7
    advantages, returns = gae(t([0, 2, 5]), t([0.1, 0.3, 9.9]), t([1, 1, 0]), gamma=0.9, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([1.7, 1.7, 0.0])
    assert returns.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_gae_with_lambda_one_is_the_discounted_return_less_the_value() -> None:
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = t([1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0])
    advantages, _ = gae(rewards * mask, values, mask, gamma=0.8, lam=1.0)
    for b in range(3):
        n = int(mask[b].sum())
        for i in range(n):
            ret = sum(0.8 ** (k - i) * float(rewards[b, k]) for k in range(i, n))
            assert float(advantages[b, i]) == pytest.approx(ret - float(values[b, i]), abs=1e-5)


def test_the_clipped_surrogate_takes_the_pessimistic_side() -> None:
    old = torch.zeros(1, 4)
    new = torch.log(t([1.5, 1.5, 0.5, 0.5])).requires_grad_()
    advantages = t([1, -1, 1, -1])
    loss, clipped = policy_loss(new, old, advantages, torch.ones(1, 4), clip=0.2)
    # per token: max(-A r, -A clip(r)) = -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 0.5 + 0.8) / 4)
    assert float(clipped) == 0.5
    loss.backward()
    assert new.grad is not None
    assert new.grad[0, 0] == 0 and new.grad[0, 3] == 0  # no push beyond the clip
    assert new.grad[0, 1] > 0 and new.grad[0, 2] < 0  # the others move against their advantage's sign


def test_the_value_loss_clips_the_move_from_the_rollout_values() -> None:
    returns, old, mask = t([1.0, 1.0]), t([0.0, 0.0]), t([1.0, 1.0])
    # 0.8 is beyond the clip (0.2): the clipped value 0.2 is further from 1, so its error counts
    assert float(value_loss(t([0.8, 0.1]), old, returns, mask, clip=0.2)) == pytest.approx(
        0.5 * ((1 - 0.2) ** 2 + (1 - 0.1) ** 2) / 2
    )


def test_the_kl_estimate_is_zero_at_the_reference_and_unbiased() -> None:
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    exact = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_per_token(p.log()[tokens][None], q.log()[tokens][None], torch.ones(1, len(tokens))).mean()
    assert float(estimate) == pytest.approx(exact, rel=0.03)
    same = p.log()[tokens][None]
    assert float(kl_per_token(same, same, torch.ones_like(same)).abs().max()) == 0


def test_rewards_are_the_penalty_per_token_and_the_score_on_the_last() -> None:
    kl, mask = t([0.5, 0.5, 0.5], [1.0, 1.0, 1.0]), t([1, 1, 1], [1, 1, 0])
    rewards = token_rewards(torch.tensor([2.0, 3.0]), kl, mask, kl_coef=0.1)
    assert rewards.tolist()[0] == pytest.approx([-0.05, -0.05, 1.95])
    assert rewards.tolist()[1] == pytest.approx([-0.1, 2.9, 0.0])


def test_whitened_advantages_have_zero_mean_and_unit_spread_on_the_tokens() -> None:
    values, mask = t([1, 2, 3, 100], [4, 5, 6, 100]), t([1, 1, 1, 0], [1, 1, 1, 0])
    out = whiten(values, mask)
    kept = out[mask.bool()]
    assert float(kept.mean()) == pytest.approx(0, abs=1e-6) and float(kept.std(unbiased=False)) == pytest.approx(1)
    assert out[:, 3].tolist() == [0, 0]


def test_the_adaptive_coefficient_moves_towards_the_target_in_bounded_steps() -> None:
    fixed = AdaptiveKL(0.1)
    assert fixed.update(50.0, 64) == 0.1
    adaptive = AdaptiveKL(0.1, target=6.0, horizon=640)
    assert adaptive.update(60.0, 64) == pytest.approx(0.1 * 1.02)  # error clipped to +0.2, times 64 / 640
    assert adaptive.update(6.0, 64) == pytest.approx(0.1 * 1.02)
    assert adaptive.update(3.0, 64) == pytest.approx(0.1 * 1.02 * 0.98)  # -0.5 clipped to -0.2
    assert adaptive.update(5.7, 640) == pytest.approx(0.1 * 1.02 * 0.98 * 0.95)  # -0.05, a whole horizon


def test_the_completion_mask_ends_after_the_first_end_token() -> None:
    completions = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    assert ppo_loop.completion_mask(completions, eos_id=0).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_the_prompt_stream_visits_each_prompt_once_per_epoch_and_workers_take_different_ones() -> None:
    taken = [ppo_loop.prompt_rows(step, rank, 2, 3, 12, seed=0) for step in range(2) for rank in range(2)]
    assert sorted(i for rows in taken for i in rows) == list(range(12))
    assert ppo_loop.prompt_rows(1, 1, 2, 3, 12, seed=0) == taken[3]  # the same on a resume
    assert ppo_loop.prompt_rows(0, 0, 2, 3, 12, seed=1) != taken[0]


def tiny_models() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LlamaForSequenceClassification]:
    """A policy, its frozen copy, and a reward model that scores only the last token (its layers add nothing
    to the embedding), so the best completions are easy to find and the test is short."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    policy = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config)
    reference.load_state_dict(policy.state_dict())
    reward = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1, "id2label": None}))
    with torch.no_grad():
        for layer in reward.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return policy, reference.eval().requires_grad_(False), reward.eval().requires_grad_(False)


def train(kl_coef: float, steps: int = 12) -> list[tuple[float, float]]:
    """(mean reward, mean KL) of each step's rollout of PPO on the tiny models."""
    torch.set_num_threads(1)
    policy, reference, reward = tiny_models()
    model = ppo_loop.PolicyWithValue(policy, kl_coef)
    params = ppo_loop.PPOParams(max_completion_length=4, ppo_epochs=4, kl_coef=kl_coef)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator()
    prompts = {"input_ids": torch.randint(1, 16, (32, 3)), "attention_mask": torch.ones(32, 3, dtype=torch.long)}
    prompts["attention_mask"][:8, 0] = 0  # some prompts are left-padded
    curve = []
    for step in range(steps):
        torch.manual_seed(step)
        generator.manual_seed(step)
        batch = ppo_loop.rollout(model, reference, reward, prompts, params, eos_id=0, pad_id=0)
        ppo_loop.update(model, optimizer, batch, params, kl_coef, 16, 1.0, generator)
        curve.append((float(batch.scores.mean()), float(batch.kl().mean())))
    return curve


def test_ppo_raises_the_reward_and_its_kl_coefficient_holds_the_policy_near_the_reference() -> None:
    free, held = train(kl_coef=0.0), train(kl_coef=1.0)
    assert free[0][1] == 0 and held[0][1] == 0  # the first rollout comes from the reference itself
    start, end = sum(r for r, _ in free[:3]) / 3, sum(r for r, _ in free[-3:]) / 3
    assert end > start + 0.04, free  # of a best possible 0.16 per completion (the best last token's score)
    assert math.isfinite(free[-1][1]) and free[-1][1] < 10, free  # nats per completion of 4 tokens
    assert sum(k for _, k in held[-3:]) < 0.5 * sum(k for _, k in free[-3:]), (held, free)
