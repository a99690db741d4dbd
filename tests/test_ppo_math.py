"""nanorlhf/ppo.py against tiny per-row python loops and hand-computed cases: the helpers,
diagnostics and checks around the assignments. The assignments themselves (kl_penalty_rewards,
compute_gae, masked_whiten, policy_loss, value_loss, adaptive_kl) are tested in tests/assignments/."""
import math

import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.config import PPOConfig, make_config
from nanorlhf.ppo import (FixedKLController, entropy_from_logits, explained_variance, kl_penalty_rewards,
                          last_token_index, masked_mean, masked_var)

T = 5  # columns of ragged_mask()


# ---------------------------------------------------------------- masking helpers

def test_masked_mean_and_var_match_real_tokens_only():
    g = torch.Generator().manual_seed(0)
    mask = ragged_mask()
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
    mask = ragged_mask()
    assert last_token_index(mask).tolist() == [2, 0, 4, -1, 1]
    assert last_token_index(mask).dtype == torch.long


# ---------------------------------------------------------------- rewards

def test_kl_penalty_rewards_rejects_wrong_score_shape():
    mask = ragged_mask()
    with pytest.raises(ValueError, match=r"scores must be \(B,\)"):
        kl_penalty_rewards(torch.zeros(len(LENGTHS), 1), torch.zeros(len(LENGTHS), T), torch.zeros(len(LENGTHS), T),
                           mask, 0.1)


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
    mask = ragged_mask()
    g = torch.Generator().manual_seed(7)
    returns = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64), mask)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(-returns, returns, mask).item() < 0


# ---------------------------------------------------------------- KL controllers

def test_fixed_kl_controller():
    kl = FixedKLController(0.05)
    kl.update(100.0, 512)
    assert kl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(kl.state_dict())
    assert other.value == 0.05



@pytest.mark.parametrize("preset", ["tiny", "cpu", "gpu"])
def test_ppo_settings_are_designs_in_every_preset(preset):
    """docs/design.md details 5, 7, 8: the unit tests pass these numbers in, so the shipped settings are pinned here."""
    cfg = make_config(PPOConfig, "ppo", preset=preset)
    assert (cfg.gamma, cfg.lam) == (1.0, 0.95)  # detail 5
    assert (cfg.clip_range, cfg.clip_range_value, cfg.vf_coef, cfg.ppo_epochs) == (0.2, 0.2, 0.1, 4)  # detail 7
    assert (cfg.adaptive_kl, cfg.target_kl, cfg.kl_horizon) == (True, 6.0, 10000)  # detail 8
