"""Assignment group_advantages (nanorlhf/pg.py): GRPO's group-relative advantages (r - mean) / (std + eps)
(Shao et al. 2024) and Dr. GRPO's r - mean (Liu et al. 2025), over the valid members of ragged groups."""
import math

import torch

from nanorlhf.pg import group_advantages
from teach import JUNK, close, reads_padding, unchanged, with_junk

REWARDS = torch.tensor([[1.0, 2.0, 6.0, 3.0], [4.0, -2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
VALID = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def loop_advantages(rewards, valid, scale_by_std=True, eps=1e-4):
    """The obviously-correct loop over groups: mean and Bessel-corrected std of the valid members."""
    out = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        members = [j for j in range(rewards.shape[1]) if valid[g, j]]
        rs = [float(rewards[g, j]) for j in members]
        mean = sum(rs) / len(rs)
        std = math.sqrt(sum((r - mean) ** 2 for r in rs) / max(len(rs) - 1, 1))
        for j, r in zip(members, rs):
            out[g, j] = (r - mean) / (std + eps) if scale_by_std else r - mean
    return out


def test_grpo_matches_a_loop():
    close(group_advantages(REWARDS, VALID, eps=0.25), loop_advantages(REWARDS, VALID, eps=0.25),
          "GRPO advantages (r - mean) / (std + eps) per group")


def test_dr_grpo_does_not_divide_by_the_std():
    close(group_advantages(REWARDS, VALID, scale_by_std=False), loop_advantages(REWARDS, VALID, scale_by_std=False),
          "with scale_by_std=False (Dr. GRPO) the advantage is r - mean, not divided by the std")


def test_grpo_std_uses_bessels_correction():
    # the group (0, 2): mean 1, std with n - 1 = sqrt(2); with n it would be 1
    out = group_advantages(torch.tensor([[0.0, 2.0]], dtype=torch.float64), torch.ones(1, 2), eps=0.0)
    close(out, torch.tensor([[-1 / math.sqrt(2), 1 / math.sqrt(2)]], dtype=torch.float64),
          "the group's std uses Bessel's correction (divide by n - 1, torch.std's default), not by n")


def test_grpo_eps_is_added_outside_the_root():
    # the group (0, 1), eps 0.5: std = sqrt(0.5); (std + eps) differs from sqrt(var + eps) = 1
    out = group_advantages(torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.ones(1, 2), eps=0.5)
    expected = torch.tensor([[-0.5, 0.5]], dtype=torch.float64) / (math.sqrt(0.5) + 0.5)
    close(out, expected, "eps is added to the std, outside the square root: (r - mean) / (std + eps)")


def test_grpo_uses_the_eps_it_is_given():
    out = group_advantages(torch.tensor([[0.0, 2.0]], dtype=torch.float64), torch.ones(1, 2), eps=1.0)
    close(out, torch.tensor([[-1.0, 1.0]], dtype=torch.float64) / (math.sqrt(2) + 1.0),
          "use the eps you are given (here 1.0), not a constant")


def test_grpo_mean_over_valid_members_only():
    out = group_advantages(REWARDS[1:2], VALID[1:2], scale_by_std=False)
    close(out[0, :2], torch.tensor([3.0, -3.0], dtype=torch.float64),
          "the group mean is over its VALID members (divide by their count), not over all k slots")


def test_grpo_is_zero_where_not_valid():
    for scale in (True, False):
        out = group_advantages(REWARDS, VALID, scale_by_std=scale)
        assert bool((out[VALID == 0] == 0).all()), "advantages must be 0 on invalid slots"
        close(out[1, :2], loop_advantages(REWARDS, VALID, scale)[1, :2],
              "invalid slots must not enter the group's mean or std")


def test_grpo_group_of_one_is_finite_and_zero():
    out = group_advantages(REWARDS[2:], VALID[2:])
    assert bool(torch.isfinite(out).all()), "a group of one must not divide by n - 1 = 0: its advantage is 0"
    close(out, torch.zeros_like(out), "a group of one has advantage 0")


def test_grpo_never_reads_invalid_members():
    for scale in (True, False):
        reference = group_advantages(REWARDS, VALID, scale_by_std=scale)
        results = {junk: group_advantages(with_junk(REWARDS, VALID, v), VALID, scale_by_std=scale)
                   for junk, v in JUNK.items()}
        reads_padding(results, reference, "the group advantages")


def test_grpo_keeps_the_dtype_and_does_not_change_its_inputs():
    rewards, valid = with_junk(REWARDS, VALID, float("nan")).float(), VALID.clone()
    before = {"rewards": rewards.clone(), "valid": valid.clone()}
    out = group_advantages(rewards, valid)
    assert out.dtype == torch.float32, f"advantages of float32 rewards must be float32 (the dtype rule), got {out.dtype}"
    unchanged(before, {"rewards": rewards, "valid": valid}, "group_advantages")
