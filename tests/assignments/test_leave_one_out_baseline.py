"""Assignment leave_one_out_baseline (nanorlhf/pg.py): RLOO's baseline, the mean reward of the other valid
members of each group (Ahmadian et al. 2024, Eq. 7), in ragged groups whose invalid slots hold junk."""
import torch

from nanorlhf.pg import leave_one_out_baseline
from teach import JUNK, close, reads_padding, unchanged, with_junk

REWARDS = torch.tensor([[1.0, 2.0, 6.0, 3.0], [4.0, -2.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
VALID = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])


def loop_baseline(rewards, valid):
    """The obviously-correct loop: for each valid member, the mean of the other valid members (0 if none)."""
    out = torch.zeros_like(rewards)
    for g in range(rewards.shape[0]):
        members = [j for j in range(rewards.shape[1]) if valid[g, j]]
        for i in members:
            others = [float(rewards[g, j]) for j in members if j != i]
            out[g, i] = sum(others) / len(others) if others else 0.0
    return out


def test_rloo_baseline_matches_a_loop():
    close(leave_one_out_baseline(REWARDS, VALID), loop_baseline(REWARDS, VALID), "the leave-one-out baselines")


def test_rloo_baseline_leaves_out_the_sample_itself():
    out = leave_one_out_baseline(REWARDS[:1], VALID[:1])
    # member 2 (reward 6): the others average (1 + 2 + 3) / 3 = 2; the group mean 3 would include its own reward
    close(out[0, 2], torch.tensor(2.0, dtype=torch.float64),
          "the baseline of a sample must not contain its own reward: the mean of the OTHER members, (sum - r_i) / (n - 1)")


def test_rloo_counts_only_valid_members():
    out = leave_one_out_baseline(REWARDS[1:2], VALID[1:2])
    close(out[0, :2], torch.tensor([-2.0, 4.0], dtype=torch.float64),
          "in a ragged group n is the number of VALID members, not k: a group of two divides by 1")


def test_rloo_group_of_one_has_baseline_zero():
    out = leave_one_out_baseline(REWARDS[2:], VALID[2:])
    assert bool(torch.isfinite(out).all()), "a group of one divided by n - 1 = 0: its baseline is 0 (no other member)"
    close(out, torch.zeros_like(out), "a group of one has no other member: its baseline is 0")


def test_rloo_is_zero_where_not_valid():
    out = leave_one_out_baseline(REWARDS, VALID)
    assert bool((out[VALID == 0] == 0).all()), "the baseline must be 0 on invalid slots (multiply or where by valid)"


def test_rloo_never_reads_invalid_members():
    reference = leave_one_out_baseline(REWARDS, VALID)
    results = {junk: leave_one_out_baseline(with_junk(REWARDS, VALID, v), VALID) for junk, v in JUNK.items()}
    reads_padding(results, reference, "the leave-one-out baseline")


def test_rloo_keeps_the_dtype_and_does_not_change_its_inputs():
    rewards, valid = with_junk(REWARDS, VALID, float("nan")).float(), VALID.clone()
    before = {"rewards": rewards.clone(), "valid": valid.clone()}
    out = leave_one_out_baseline(rewards, valid)
    assert out.dtype == torch.float32, f"baselines of float32 rewards must be float32 (the dtype rule), got {out.dtype}"
    unchanged(before, {"rewards": rewards, "valid": valid}, "leave_one_out_baseline")
