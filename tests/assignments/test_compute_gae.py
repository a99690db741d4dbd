"""Assignment compute_gae (nanorlhf/ppo.py): generalised advantage estimation against a per-row loop
and a hand-computed case. docs/design.md detail 5: GAE over response tokens only, V after the end is 0."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import compute_gae
from teach import JUNK, close, reads_padding, unchanged, with_junk

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


# ---------------------------------------------------------------- one test per common bug

def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask()
    return (torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64),
            torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask)


def check_against_loop(rewards, values, mask, gamma, lam, what):
    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_loop(rewards.tolist(), values.tolist(), LENGTHS, gamma, lam)
    close(advantages, torch.tensor(ref_adv, dtype=torch.float64), f"advantages {what}")
    close(returns, torch.tensor(ref_ret, dtype=torch.float64), f"returns {what}")


def test_compute_gae_value_after_the_end_is_zero():
    # one real token of two, r = 1, V = 0.5, junk V = 9 after it: A = 1 - 0.5 = 0.5 (not 1 + 9 - 0.5)
    adv, _ = compute_gae(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 9.0]]), torch.tensor([[1.0, 0.0]]), 1.0, 0.95)
    close(adv[0, 0], 0.5, "advantage of the last real token: r - V, the value after the end is 0, "
                          "not the value stored in the padding")


def test_compute_gae_runs_backwards():
    # r = (0, 1), V = 0, gamma = lam = 1: A_0 = 0 + A_1 = 1
    adv, _ = compute_gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    close(adv, torch.tensor([[1.0, 1.0]]), "advantages of r=(0, 1), V=0: A_t sums the future, computed backwards")


def test_compute_gae_uses_lambda():
    rewards, values, mask = inputs(41)
    check_against_loop(rewards, values, mask, 1.0, 0.5, "with gamma=1, lam=0.5 (is lam in gamma * lam * A_{t+1}?)")


def test_compute_gae_gamma_discounts_the_next_value():
    rewards, values, mask = inputs(42)
    check_against_loop(rewards, values, mask, 0.8, 1.0, "with gamma=0.8, lam=1 (gamma * V_{t+1} in delta, and "
                                                       "gamma * lam on the next advantage)")


def test_compute_gae_returns_are_advantages_plus_values():
    rewards, values, mask = inputs(43)
    advantages, returns = compute_gae(rewards, values, mask, 0.9, 0.7)
    close(returns * mask, (advantages + values) * mask, "returns on real tokens: A + V (the value target)")


def test_compute_gae_zero_on_padding():
    rewards, values, mask = inputs(44)
    advantages, returns = compute_gae(with_junk(rewards, mask, 3.0), with_junk(values, mask, 3.0), mask, 1.0, 0.95)
    assert (advantages[mask == 0] == 0).all(), "advantages must be 0 on padding"
    assert (returns[mask == 0] == 0).all(), "returns must be 0 on padding"


def test_compute_gae_never_reads_the_padding():
    rewards, values, mask = inputs(45)
    reference = compute_gae(rewards * mask, values * mask, mask, 0.99, 0.95)
    reads_padding({junk: compute_gae(with_junk(rewards, mask, v), with_junk(values, mask, v), mask, 0.99, 0.95)
                   for junk, v in JUNK.items()}, reference, "compute_gae")


def test_compute_gae_does_not_change_its_inputs():
    rewards, values, mask = inputs(46)
    args = {"rewards": with_junk(rewards, mask, 5.0), "values": with_junk(values, mask, 5.0), "mask": mask}
    before = {k: v.clone() for k, v in args.items()}
    compute_gae(*args.values(), 1.0, 0.95)
    unchanged(before, args, "compute_gae")
