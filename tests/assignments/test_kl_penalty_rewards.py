"""Assignment kl_penalty_rewards (nanorlhf/ppo.py): the per-token reward of RLHF against a per-row loop.
docs/design.md details 1 and 2: RM score at the final real token minus beta * KL on every token."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import kl_penalty_rewards

T = 5  # columns of ragged_mask()


def test_kl_penalty_rewards_matches_loop():
    g = torch.Generator().manual_seed(1)
    B = len(LENGTHS)
    mask = ragged_mask()
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    logprobs = with_garbage(-torch.rand(B, T, generator=g, dtype=torch.float64) * 3, mask)
    ref_logprobs = with_garbage(-torch.rand(B, T, generator=g, dtype=torch.float64) * 3, mask, -7.0)
    kl_coef = 0.15
    rewards = kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    assert rewards.shape == (B, T)
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            expected = 0.0
            if t < n:
                expected = -kl_coef * (logprobs[b, t].item() - ref_logprobs[b, t].item())
            if t == n - 1:
                expected += scores[b].item()
            assert rewards[b, t].item() == pytest.approx(expected, abs=1e-12), (b, t)


def test_kl_penalty_rewards_hand_computed():
    # kl_coef 0.5; row 0 has 2 real tokens of 3, score 3:
    #   t=0: -0.5 * (-1.0 - -1.5) = -0.25;  t=1: -0.5 * (-2.0 - -1.0) + 3 = 3.5;  t=2: padding, 0
    # row 1 is empty: no token, so no score either
    rewards = kl_penalty_rewards(torch.tensor([3.0, 7.0]), torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]]),
                                 torch.tensor([[-1.5, -1.0, 4.0], [0.0, 0.0, 0.0]]),
                                 torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.25, 3.5, 0.0], [0.0, 0.0, 0.0]]))
