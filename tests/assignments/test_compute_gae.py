"""Assignment compute_gae (nanorlhf/ppo.py): generalised advantage estimation against a per-row loop
and a hand-computed case. docs/design.md detail 5: GAE over response tokens only, V after the end is 0."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import compute_gae

T = 5  # columns of ragged_mask()


def gae_loop(rewards, values, lengths, gamma, lam):
    B, T = len(rewards), len(rewards[0])
    advantages = [[0.0] * T for _ in range(B)]
    returns = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        gae = 0.0
        for t in reversed(range(n)):
            next_value = values[b][t + 1] if t + 1 < n else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            gae = delta + gamma * lam * gae
            advantages[b][t] = gae
            returns[b][t] = gae + values[b][t]
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.5, 0.7)])
def test_compute_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(2)
    mask = ragged_mask()
    rewards = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask)
    values = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask, -3e5)
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(ref_adv, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, torch.tensor(ref_ret, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_compute_gae_hand_computed_length_one_and_two():
    # row 0: one token, r=2, V=0.5 -> A = 2 - 0.5 = 1.5, R = 2
    # row 1: r=(0, 1), V=(0.2, 0.4), gamma=1, lam=0.5
    #   A_1 = 1 - 0.4 = 0.6;  delta_0 = 0 + 0.4 - 0.2 = 0.2;  A_0 = 0.2 + 0.5 * 0.6 = 0.5
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    rewards = torch.tensor([[2.0, 9.0], [0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0], [0.2, 0.4]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.5, 0.0], [0.5, 0.6]]))
    torch.testing.assert_close(returns, torch.tensor([[2.0, 0.0], [0.7, 1.0]]))
