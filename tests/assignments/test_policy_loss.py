"""Assignment policy_loss (nanorlhf/ppo.py): PPO's clipped surrogate by hand, its gradient and stats.
docs/design.md details 3 and 7: ratio exactly 1 and approx-KL 0 when logprobs are aligned; clip 0.2."""
import math

import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import masked_mean, policy_loss

T = 5  # columns of ragged_mask()


def test_policy_loss_at_ratio_one():
    g = torch.Generator().manual_seed(5)
    mask = ragged_mask()
    logprobs = -torch.rand(len(LENGTHS), T, generator=g)
    advantages = with_garbage(torch.randn(len(LENGTHS), T, generator=g), mask)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip=0.2)
    assert stats["ratio"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0
    assert stats["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-masked_mean(advantages, mask).item(), abs=1e-7)


def test_policy_loss_hand_computed_clipping():
    # clip 0.2; per token: ratio r, advantage A -> max(-A r, -A clip(r)), clipped?
    #   r=1.5 A= 1: max(-1.5, -1.2) = -1.2  clipped (gradient 0)
    #   r=0.5 A=-1: max( 0.5,  0.8) =  0.8  clipped (gradient 0)
    #   r=1.1 A= 2: max(-2.2, -2.2) = -2.2  inside the range
    #   r=0.7 A= 1: max(-0.7, -0.8) = -0.7  below the range but A > 0: unclipped, gradient flows
    #   r=1.5 A=-1: max( 1.5,  1.2) =  1.5  above the range but A < 0: unclipped, gradient flows
    # loss = (-1.2 + 0.8 - 2.2 - 0.7 + 1.5) / 5 = -0.36, clipfrac = 2 / 5
    ratios = torch.tensor([[1.5, 0.5, 1.1, 1.0], [0.7, 1.5, 1.0, 1.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 5.0], [1.0, -1.0, 5.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    old_logprobs = torch.full_like(ratios, -2.0)
    logprobs = (old_logprobs + ratios.log() + torch.tensor([[0, 0, 0, 3.0], [0, 0, 3.0, 3.0]])).requires_grad_()
    loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip=0.2)
    assert loss.item() == pytest.approx(-0.36, abs=1e-12)
    assert stats["clipfrac"].item() == pytest.approx(0.4, abs=1e-12)
    real_ratios = [1.5, 0.5, 1.1, 0.7, 1.5]
    assert stats["ratio"].item() == pytest.approx(sum(real_ratios) / 5, abs=1e-12)
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in real_ratios) / 5, abs=1e-12)
    assert not stats["ratio"].requires_grad
    loss.backward()
    # d/dlogprob of -A r = -A r (ratio = exp(logprob - old)), divided by 5 real tokens; 0 when clipped or padded
    expected_grad = torch.tensor([[0.0, 0.0, -2.2 / 5, 0.0], [-0.7 / 5, 1.5 / 5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=0, atol=1e-12)
