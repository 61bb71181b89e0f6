"""The arithmetic of PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), on plain tensors.

A rollout is a batch of B completions of up to T tokens. Every tensor here is (B, T) over the
completion's tokens, with `mask` 1 on the tokens generated (up to and including the end-of-sequence
token) and 0 on the padding after it. Token t is the action taken in state "prompt + tokens < t".

    per-token reward   r_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))      (+ the reward model's score on
                                                                                the last token)
    GAE                delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lambda * A_{t+1}
    returns            R_t = A_t + V_t                                        (the value head's target)
    policy loss        max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)),   ratio = pi / pi_old
    value loss         0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)

The KL coefficient is fixed, or adapted after each batch towards a target KL (AdaptiveKL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where mask is 1 (a scalar)."""
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the masked positions (advantages, so the step size does not ride on the
    reward's scale); 0 where mask is 0."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + 1e-8) * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(a_t) - log pi_ref(a_t) of the sampled tokens: summed over a completion, an unbiased estimate of
    KL(pi || pi_ref) for it (its expectation under pi). (B, T), 0 on padding."""
    return (logprobs - ref_logprobs) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The reward of each token: the KL penalty everywhere, the reward model's score (B,) added on the last
    generated token. (B, T)."""
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,) index of the last generated token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, both (B, T); the value after the last token is 0."""
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(steps)):
        going_on = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(running)  # 0: t is the last token
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * going_on * next_value - values[:, t]
        running = delta + gamma * lam * going_on * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the share of tokens where the clip was active."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """The value head's squared error to the returns, its move from the rollout's values clipped (PPO2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


@dataclass
class AdaptiveKL:
    """The KL coefficient: fixed (target 0), or moved towards `target` KL per completion (nats).

    After each batch, coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon (Ziegler et
    al.): a proportional controller whose step is bounded, so one noisy batch moves it little.
    """

    coef: float
    target: float = 0.0
    horizon: int = 10000

    def update(self, kl: float, batch_size: int) -> float:
        if self.target > 0:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * batch_size / self.horizon
        return self.coef
