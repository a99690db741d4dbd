"""nanorlhf/ppo.py against tiny per-row python loops and hand-computed cases."""
import inspect
import math
import re

import pytest
import torch

from nanorlhf import ppo
from nanorlhf.ppo import (AdaptiveKLController, FixedKLController, compute_gae, entropy_from_logits,
                          explained_variance, kl_penalty_rewards, last_token_index, masked_mean,
                          masked_var, masked_whiten, policy_loss, value_loss)

# right-padded rows of different lengths: 3, 1 (a lone EOT), 5 (full, no EOT), 0 (empty), 2
LENGTHS = [3, 1, 5, 0, 2]
T = 5


def make_mask(lengths=LENGTHS, T=T):
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths], dtype=torch.float64)


def with_garbage(x, mask, value=1e6):
    # padding that holds junk: results on real tokens must not depend on it
    return torch.where(mask > 0, x, torch.full_like(x, value))


# ---------------------------------------------------------------- masking helpers

def test_masked_mean_and_var_match_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    mask = make_mask()
    x = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask, float("nan"))
    real = [x[b, t].item() for b in range(len(LENGTHS)) for t in range(LENGTHS[b])]
    mean = sum(real) / len(real)
    assert masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-12)
    var = sum((v - mean) ** 2 for v in real) / (len(real) - 1)
    assert masked_var(x, mask).item() == pytest.approx(var, abs=1e-12)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(var * (len(real) - 1) / len(real), abs=1e-12)
    row_means = masked_mean(x, mask, dim=1)
    for b, n in enumerate(LENGTHS):
        expected = sum(x[b, :n].tolist()) / n if n else 0.0
        assert row_means[b].item() == pytest.approx(expected, abs=1e-12)


def test_masked_var_unbiased_needs_two_tokens():
    with pytest.raises(ValueError, match="unbiased=False"):
        masked_var(torch.ones(1, 3), torch.tensor([[1.0, 0.0, 0.0]]))


def test_last_token_index():
    mask = make_mask()
    assert last_token_index(mask).tolist() == [2, 0, 4, -1, 1]
    assert last_token_index(mask).dtype == torch.long


# ---------------------------------------------------------------- rewards

def test_kl_penalty_rewards_matches_loop():
    g = torch.Generator().manual_seed(1)
    B = len(LENGTHS)
    mask = make_mask()
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


def test_kl_penalty_rewards_rejects_wrong_score_shape():
    mask = make_mask()
    with pytest.raises(ValueError, match=r"scores must be \(B,\)"):
        kl_penalty_rewards(torch.zeros(len(LENGTHS), 1), torch.zeros(len(LENGTHS), T), torch.zeros(len(LENGTHS), T),
                           mask, 0.1)


# ---------------------------------------------------------------- GAE

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
    mask = make_mask()
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


# ---------------------------------------------------------------- whitening

def test_masked_whiten_ignores_padding():
    g = torch.Generator().manual_seed(3)
    mask = make_mask()
    x = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 3 + 2
    a = masked_whiten(with_garbage(x, mask, 1e6), mask)
    b = masked_whiten(with_garbage(x, mask, -42.0), mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a[mask == 0] == 0).all()
    assert masked_mean(a, mask).item() == pytest.approx(0.0, abs=1e-9)
    assert masked_var(a, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    # against the formula on the real entries alone
    real = x[mask > 0]
    expected = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8)
    torch.testing.assert_close(a[mask > 0], expected)


def test_masked_whiten_keeps_mean_without_shift():
    g = torch.Generator().manual_seed(4)
    mask = make_mask()
    x = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 3 + 2, mask)
    y = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(y, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(y, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (y[mask == 0] == 0).all()


# ---------------------------------------------------------------- policy loss

def test_policy_loss_at_ratio_one():
    g = torch.Generator().manual_seed(5)
    mask = make_mask()
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


# ---------------------------------------------------------------- value loss

def test_value_loss_hand_computed_clipping():
    # clip 0.2; V_clip = clip(V, V_old - 0.2, V_old + 0.2); term = max((V-R)^2, (V_clip-R)^2)
    #   V=1.0 V_old=0.5 R=1.0: V_clip=0.7, max(0, 0.09)    = 0.09  clipped (gradient 0)
    #   V=0.0 V_old=0.1 R=0.5: V_clip=0.0, max(0.25, 0.25) = 0.25  inside
    #   V=2.0 V_old=1.0 R=0.0: V_clip=1.2, max(4, 1.44)    = 4     unclipped
    #   V=0.5 V_old=1.0 R=0.5: V_clip=0.8, max(0, 0.09)    = 0.09  clipped (gradient 0)
    # loss = 0.5 * (0.09 + 0.25 + 4 + 0.09) / 4 = 0.55375, value_clipfrac = 2 / 4
    values = torch.tensor([[1.0, 0.0, 7.0], [2.0, 0.5, -7.0]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[0.5, 0.1, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    loss, stats = value_loss(values, old_values, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.55375, abs=1e-12)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5, abs=1e-12)
    loss.backward()
    # d/dV 0.5 * (V-R)^2 / 4 = (V-R) / 4 on unclipped real tokens
    expected_grad = torch.tensor([[0.0, -0.5 / 4, 0.0], [2.0 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- diagnostics

def test_entropy_from_logits():
    V = 8
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logits = torch.zeros(1, 3, V)
    logits[0, 1, 2:] = float("-inf")        # top-k of 2: entropy log 2
    logits[0, 2] = torch.randn(V)           # padding: ignored
    assert entropy_from_logits(logits, mask).item() == pytest.approx((math.log(V) + math.log(2)) / 2, abs=1e-6)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, V, generator=g)
    p = logits.softmax(-1)
    per_token = [[-sum(p[b, t, v].item() * math.log(p[b, t, v].item()) for v in range(V)) for t in range(3)]
                 for b in range(2)]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    expected = (sum(per_token[0]) + per_token[1][0]) / 4
    assert entropy_from_logits(logits, mask).item() == pytest.approx(expected, abs=1e-5)


def test_explained_variance():
    mask = make_mask()
    g = torch.Generator().manual_seed(7)
    returns = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(-returns, returns, mask).item() < 0


# ---------------------------------------------------------------- KL controllers

def test_adaptive_kl_controller():
    kl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    kl.update(7.0, n_steps=100)                      # error 7/6 - 1 = 1/6, inside the clip
    assert kl.value == pytest.approx(0.1 * (1 + (1 / 6) * 100 / 10000), rel=1e-12)
    before = kl.value
    kl.update(600.0, n_steps=256)                    # 100x target: error clipped at +0.2
    assert kl.value == pytest.approx(before * (1 + 0.2 * 256 / 10000), rel=1e-12)
    before = kl.value
    kl.update(0.0, n_steps=256)                      # far below: error clipped at -0.2
    assert kl.value == pytest.approx(before * (1 - 0.2 * 256 / 10000), rel=1e-12)
    before = kl.value
    kl.update(torch.tensor(6.0), n_steps=256)        # on target (a tensor works too): unchanged
    assert kl.value == before
    kl.update(3.0, n_steps=64)                       # below target lowers it
    assert kl.value < before


def test_kl_controller_state_round_trip():
    kl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    kl.update(12.0, 512)
    state = kl.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    kl.update(9.0, 512)
    resumed.update(9.0, 512)
    assert resumed.value == kl.value and resumed.state_dict() == kl.state_dict()


def test_fixed_kl_controller():
    kl = FixedKLController(0.05)
    kl.update(100.0, 512)
    assert kl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(kl.state_dict())
    assert other.value == 0.05


# ---------------------------------------------------------------- coursework markers

def strip_assignments(source):
    # what a coursework build does: each marked body becomes a raise, indentation kept
    pattern = re.compile(r"^( *)# BEGIN ASSIGNMENT (\w+)\n.*?^ *# END ASSIGNMENT\n", re.S | re.M)
    return pattern.sub(lambda m: f'{m.group(1)}raise NotImplementedError("{m.group(2)}")\n', source)


def test_assignment_regions_are_whole_bodies():
    source = inspect.getsource(ppo)
    names = re.findall(r"# BEGIN ASSIGNMENT (\w+)", source)
    assert names == ["kl_penalty_rewards", "compute_gae", "masked_whiten", "policy_loss", "value_loss",
                     "adaptive_kl"]
    assert source.count("# END ASSIGNMENT") == len(names)
    namespace = {}
    exec(compile(strip_assignments(source), "ppo_stripped", "exec"), namespace)
    x, mask = torch.zeros(1, 2), torch.ones(1, 2)
    calls = [
        lambda: namespace["kl_penalty_rewards"](torch.zeros(1), x, x, mask, 0.1),
        lambda: namespace["compute_gae"](x, x, mask, 1.0, 0.95),
        lambda: namespace["masked_whiten"](x, mask),
        lambda: namespace["policy_loss"](x, x, x, mask, 0.2),
        lambda: namespace["value_loss"](x, x, x, mask, 0.2),
        lambda: namespace["AdaptiveKLController"](0.1, 6.0, 10000).update(6.0, 1),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError):
            call()
    assert namespace["masked_mean"](torch.ones(2), torch.ones(2)).item() == 1.0   # helpers stay intact
