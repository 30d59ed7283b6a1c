"""PPO's pure math against hand-computed values and textbook loops."""

from __future__ import annotations

import math

import pytest
import torch

from chatrlhf.losses import (
    gae,
    group_normalized_advantages,
    kl_penalty,
    leave_one_out_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    token_rewards,
    value_loss,
)


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook backward recursion, one sequence at a time."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t] = last
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_vectorised_gae_equals_the_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 9), torch.randn(5, 9)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(9)[None] < lengths[:, None]).float()
    rewards = rewards * mask
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards, values * mask, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    assert (adv * (1 - mask)).abs().max() == 0


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    # k3 = (q/p - 1) - log(q/p), q/p = exp(ref - logp)
    expected = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([expected]), atol=1e-6)
    assert (kl_penalty(torch.randn(4, 6), torch.randn(4, 6), "k3") >= 0).all()


def test_masked_whitening_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float)
    out = masked_whiten(values, mask)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (valid - valid.mean()) / valid.var(unbiased=False).sqrt()
    assert torch.allclose(out[mask.bool()], expected, atol=1e-4)
    assert (out[~mask.bool()] == 0).all()
    assert masked_mean(torch.tensor([[1.0, 100.0]]), torch.tensor([[1.0, 0.0]])) == 1.0


def test_clipped_policy_loss_inside_and_outside_the_clip():
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    ratios = torch.tensor([[1.1, 1.5, 0.9, 0.5]])
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, stats = ppo_policy_loss(ratios.log(), old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)): -1.1, -1.2 (clipped at 1.2), 0.9, 0.8 (clipped at 0.8)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.9 + 0.8) / 4, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_clipped_value_loss_hand_computed():
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    values = torch.tensor([[0.5, 0.5]])
    loss, clipfrac = value_loss(values, old, ret, mask, clip=0.2)
    # token 1: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 2: max((0.5+1)^2, (0.2+1)^2) = 2.25
    assert loss.item() == pytest.approx(0.5 * (0.64 + 2.25) / 2, abs=1e-6)
    assert clipfrac.item() == pytest.approx(0.5)


def test_token_rewards_score_at_last_token_kl_everywhere():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(torch.tensor([2.0, -1.0]), kl, 0.1, mask)
    assert torch.allclose(rewards, torch.tensor([[-0.01, -0.02, 2.0 - 0.03], [-1.0 - 0.05, 0.0, 0.0]]))


def test_leave_one_out_advantages_by_hand():
    # two prompts x two answers; per-token rewards sum to the answer's return
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]])
    adv, ret = leave_one_out_advantages(rewards, mask, group_size=2)
    # returns 1.0, 0.5 | 2.0, -1.0 (the 9.0 is padding); each baseline is the other answer's return
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0], [3.0, 3.0, 3.0], [-3.0, -3.0, 0.0]])
    assert torch.allclose(adv, expected)
    assert torch.allclose(ret[:, 0], torch.tensor([1.0, 0.5, 2.0, -1.0]))


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    rewards = torch.tensor([[1.0], [2.0], [6.0]])
    adv, _ = leave_one_out_advantages(rewards, torch.ones(3, 1), group_size=3)
    assert torch.allclose(adv[:, 0], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_group_normalized_advantages_by_hand_and_an_equal_group_gets_zero():
    # two prompts x three answers; returns 1, 2, 6 | 0.5, 0.5, 0.5 (a group whose rewards are all equal)
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [6.0, 0.0], [0.5, 0.0], [0.25, 0.25], [0.5, 9.0]])
    mask = torch.tensor([[1, 0], [1, 1], [1, 1], [1, 1], [1, 1], [1, 0]])
    adv, ret = group_normalized_advantages(rewards, mask, group_size=3)
    returns = torch.tensor([1.0, 2.0, 6.0])
    std = math.sqrt(((returns - 3.0) ** 2).sum().item() / 2)  # the sample standard deviation
    first = ((returns - 3.0) / std).tolist()
    expected = torch.tensor(
        [[first[0], 0.0], [first[1]] * 2, [first[2]] * 2, [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    )
    assert torch.allclose(adv, expected, atol=1e-5)
    assert ret[:, 0].tolist() == pytest.approx([1.0, 2.0, 6.0, 0.5, 0.5, 0.5])
    assert ret[0, 1] == 0 and ret[5, 1] == 0  # padding stays zero
