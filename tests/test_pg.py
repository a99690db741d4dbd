"""nanorlhf/pg.py against obvious python loops and closed forms: baselines and group advantages (ragged
groups, padding), the KL estimators k1, k2, k3 on two known categoricals (bias, variance, and the gradient
each gives as a loss term), the critic-free loss; and nanorlhf/pg_step.py's advantages."""
import math

import pytest
import torch

from nanorlhf.pg import RunningMeanBaseline, aggregate, group_advantages, kl_estimate, kl_k1, kl_k2, kl_k3, \
    leave_one_out_baseline, pg_loss
from nanorlhf.pg_step import group_prompts, kl_estimator_of, pg_advantages

# ragged groups: 4, 3, 1 and 2 real members of k = 4; the padding holds junk the results must ignore
SIZES = [4, 3, 1, 2]


def ragged(seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(len(SIZES), 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([[i < n for i in range(4)] for n in SIZES])
    return torch.where(valid, rewards, torch.full_like(rewards, 1e6)), valid


# ---------------------------------------------------------------- baselines and advantages

def test_leave_one_out_baseline_matches_a_loop():
    rewards, valid = ragged()
    got = leave_one_out_baseline(rewards, valid)
    for g, n in enumerate(SIZES):
        for i in range(4):
            others = [rewards[g, j].item() for j in range(n) if j != i]
            expected = sum(others) / len(others) if i < n and others else 0.0
            assert got[g, i].item() == pytest.approx(expected, abs=1e-12), (g, i)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_match_a_loop(scale_by_std):
    rewards, valid = ragged(1)
    eps = 1e-4
    got = group_advantages(rewards, valid, scale_by_std=scale_by_std, eps=eps)
    for g, n in enumerate(SIZES):
        real = [rewards[g, j].item() for j in range(n)]
        mean = sum(real) / n
        std = math.sqrt(sum((r - mean) ** 2 for r in real) / (n - 1)) if n > 1 else 0.0
        for i in range(4):
            expected = ((real[i] - mean) / (std + eps) if scale_by_std else real[i] - mean) if i < n else 0.0
            assert got[g, i].item() == pytest.approx(expected, abs=1e-9), (g, i)


def test_group_advantages_of_equal_rewards_are_zero_not_nan():
    rewards = torch.full((2, 4), 0.7)
    adv = group_advantages(rewards, torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(2, 4))


def test_running_mean_baseline_matches_a_loop():
    baseline, b = RunningMeanBaseline(0.9), None
    for seed in range(4):
        r = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mean = r.mean().item()
        expected = r - (mean if b is None else b)  # the baseline before this batch moves it
        b = mean if b is None else 0.9 * b + 0.1 * mean
        assert torch.allclose(baseline.advantages(r), expected)
    assert baseline.value == pytest.approx(b)
    restored = RunningMeanBaseline(0.9)
    restored.load_state_dict(baseline.state_dict())
    assert restored.value == baseline.value


def test_pg_advantages_per_algorithm():
    g = torch.Generator().manual_seed(3)
    B, N, k = 8, 5, 4
    scores = torch.randn(B, generator=g)
    old, ref = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    mask = torch.tensor([[1.0] * n + [0.0] * (N - n) for n in (5, 3, 1, 4, 2, 5, 0, 3)])
    kl_seq = [sum(old[b, t].item() - ref[b, t].item() for t in range(N) if mask[b, t]) for b in range(B)]
    rewards = [scores[b].item() - 0.1 * kl_seq[b] for b in range(B)]  # k1 in the reward, summed per response
    adv, r = pg_advantages("rloo", scores, old, ref, mask, k, 0.1, "k1")
    assert r.tolist() == pytest.approx(rewards, abs=1e-5)
    for b in range(B):
        group = range(b // k * k, b // k * k + k)
        loo = sum(rewards[j] for j in group if j != b) / (k - 1)
        assert adv[b].item() == pytest.approx(rewards[b] - loo, abs=1e-5)
    adv, r = pg_advantages("drgrpo", scores, old, ref, mask, k, 0.1, "k3")  # KL in the loss: reward = score
    assert torch.equal(r, scores)
    for b in range(B):
        group = [scores[j].item() for j in range(b // k * k, b // k * k + k)]
        assert adv[b].item() == pytest.approx(scores[b].item() - sum(group) / k, abs=1e-6)
    adv, _ = pg_advantages("reinforce", scores, old, ref, mask, k, 0.1, "k1", RunningMeanBaseline(0.9))
    assert adv.tolist() == pytest.approx([x - sum(rewards) / B for x in rewards], abs=1e-5)
    assert group_prompts(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]
    assert [kl_estimator_of(a, "auto") for a in ("reinforce", "rloo", "grpo", "drgrpo")] == ["k1", "k1", "k3", "k3"]
    assert kl_estimator_of("grpo", "k2") == "k2"


# ---------------------------------------------------------------- KL estimators on two known categoricals

Q = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)  # the policy, which samples
P = torch.tensor([0.15, 0.15, 0.3, 0.2, 0.2], dtype=torch.float64)  # the reference


def closed_form_kl(q, p):
    return (q * (q.log() - p.log())).sum()


def test_k1_and_k3_are_unbiased_k2_is_biased_with_less_variance():
    kl = closed_form_kl(Q, P).item()
    logq, logp = Q.log(), P.log()
    moments = {}
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        values = fn(logq, logp)  # the estimate for each outcome
        mean = (Q * values).sum().item()  # exact expectation under the sampling policy
        moments[name] = mean, (Q * (values - mean) ** 2).sum().item()
    assert moments["k1"][0] == pytest.approx(kl, rel=1e-12)
    assert moments["k3"][0] == pytest.approx(kl, rel=1e-12)
    assert abs(moments["k2"][0] - kl) > 1e-4  # biased ...
    assert moments["k2"][1] < moments["k1"][1] / 10 and moments["k3"][1] < moments["k1"][1] / 10  # ... low variance
    assert (kl_k3(logq, logp) >= 0).all() and (kl_k1(logq, logp) < 0).any()  # k3 never negative, k1 can be
    # and on samples: 200k draws from Q, the sample means within 4 standard errors of KL for k1 and k3
    draws = torch.multinomial(Q, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for name, fn in (("k1", kl_k1), ("k3", kl_k3)):
        x = fn(logq[draws], logp[draws])
        assert abs(x.mean().item() - kl) < 4 * x.std().item() / math.sqrt(len(x)), name


def test_kl_estimate_masks_padding():
    logprobs, ref = torch.randn(2, 3), torch.randn(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    for name, fn in (("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)):
        got = kl_estimate(logprobs, ref, mask, name)
        assert torch.equal(got, torch.where(mask > 0, fn(logprobs, ref), torch.zeros(2, 3)))


def expected_gradient(estimator, logits):
    """E_{y ~ q}[grad of the estimator as a loss term], exactly: the samples' weights q are not differentiated
    (they are drawn), the estimate at each outcome is."""
    logq = torch.log_softmax(logits, -1)
    weights = logq.exp().detach()
    (grad,) = torch.autograd.grad((weights * estimator(logq, P.log())).sum(), logits)
    return grad


def test_k3_as_a_loss_term_has_the_gradient_of_the_forward_kl():
    """GRPO puts k3 in the loss: its expected gradient is that of KL(pi_ref || pi), not of KL(pi || pi_ref)
    that its value estimates; k2's expected gradient is that of KL(pi || pi_ref); k1's is 0 (docs/pg.md)."""
    logits = torch.randn(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    (forward,) = torch.autograd.grad(closed_form_kl(P, torch.softmax(logits, -1)), logits)
    (reverse,) = torch.autograd.grad(closed_form_kl(torch.softmax(logits, -1), P), logits)
    assert not torch.allclose(forward, reverse, atol=1e-3)  # the two differ here, so the test can tell them apart
    assert torch.allclose(expected_gradient(kl_k3, logits), forward, atol=1e-12)
    assert torch.allclose(expected_gradient(kl_k2, logits), reverse, atol=1e-12)
    assert torch.allclose(expected_gradient(kl_k1, logits), torch.zeros(5, dtype=torch.float64), atol=1e-12)


# ---------------------------------------------------------------- the critic-free loss

def test_aggregate_sequence_and_constant_normalisers():
    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(x, mask, "sequence", 4).item() == pytest.approx(((1 + 2 + 3) / 3 + 4 / 1) / 2)
    assert aggregate(x, mask, "constant", 4).item() == pytest.approx((1 + 2 + 3 + 4) / (2 * 4))
    with pytest.raises(ValueError, match="sequence | constant"):
        aggregate(x, mask, "token", 4)


def test_pg_loss_at_ratio_one_is_minus_the_advantage_and_its_gradient_is_reinforce():
    g = torch.Generator().manual_seed(2)
    logprobs = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    loss, stats = pg_loss(logprobs, logprobs.detach(), adv, mask, 0.2, "constant", 4)
    assert stats["ratio"].item() == 1.0 and stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0
    # the constant normaliser at ratio 1: -(1 / (B * max_len)) sum_i A_i sum_t log pi(y_it), REINFORCE's gradient
    (grad,) = torch.autograd.grad(loss, logprobs)
    assert torch.allclose(grad, -adv[:, None] * mask / 12)
    assert loss.item() == pytest.approx(-(1.0 * 4 - 2.0 * 2 + 0.5 * 1) / 12)


def test_pg_loss_clips_and_adds_the_kl_term():
    logprobs = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)  # token 0: ratio e, clipped at 1.2 for A > 0
    ref = torch.tensor([[-0.5, 0.3]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    loss, stats = pg_loss(logprobs, old, torch.tensor([1.0], dtype=torch.float64), mask, 0.2, "sequence", 2,
                          ref_logprobs=ref, kl_coef=0.5, kl_estimator="k3")
    k3 = [math.expm1(-0.5) + 0.5, math.expm1(0.3) - 0.3]
    assert loss.item() == pytest.approx((-1.2 - 1.0) / 2 + 0.5 * sum(k3) / 2)
    assert stats["clipfrac"].item() == 0.5 and stats["kl_loss"].item() == pytest.approx(sum(k3) / 2)
