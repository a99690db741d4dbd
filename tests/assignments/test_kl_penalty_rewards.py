"""Assignment kl_penalty_rewards (nanorlhf/ppo.py): the per-token reward of RLHF against a per-row loop.
docs/design.md details 1 and 2: RM score at the final real token minus beta * KL on every token."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import kl_penalty_rewards
from teach import JUNK, close, reads_padding, unchanged, with_junk

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


# ---------------------------------------------------------------- one test per common bug

def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    return (torch.randn(B, generator=g, dtype=torch.float64), -torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
            -torch.rand(B, T, generator=g, dtype=torch.float64) * 3, ragged_mask())


def test_kl_penalty_is_a_penalty_not_a_bonus():
    # logprob above the reference by 1 nat, beta 0.5: r = -0.5 (plus the score 0)
    r = kl_penalty_rewards(torch.zeros(1), torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), torch.ones(1, 1), 0.5)
    close(r[0, 0], -0.5, "reward of a token 1 nat above the reference, beta 0.5: -beta * (logprob - ref_logprob)")


def test_kl_penalty_uses_the_kl_coef_it_is_given():
    scores, logprobs, ref, mask = inputs(51)
    r = kl_penalty_rewards(scores * 0, logprobs, ref, mask, 0.37)
    close(r, -0.37 * (logprobs - ref) * mask, "per-token rewards with kl_coef=0.37 (is beta hard-coded?)")


def test_kl_penalty_score_at_the_last_real_token_not_the_last_column():
    # row of 2 real tokens in 3 columns, equal logprobs: the score 3 goes at column 1
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    r = kl_penalty_rewards(torch.tensor([3.0]), torch.zeros(1, 3), torch.zeros(1, 3), mask, 0.1)
    close(r, torch.tensor([[0.0, 3.0, 0.0]]), "rewards of a 2-token response, score 3: the score at the last REAL "
                                              "token, nowhere else")


def test_kl_penalty_score_only_once():
    r = kl_penalty_rewards(torch.tensor([2.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1, 3), 0.1)
    close(r, torch.tensor([[0.0, 0.0, 2.0]]), "rewards of a 3-token response, score 2: the score once, at the end")


def test_kl_penalty_empty_response_gets_no_score():
    r = kl_penalty_rewards(torch.tensor([4.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)
    assert (r == 0).all(), f"an empty response must get no reward at all (no score, no KL), got {r.tolist()}"


def test_kl_penalty_never_reads_the_padding():
    scores, logprobs, ref, mask = inputs(52)
    reference = kl_penalty_rewards(scores, logprobs, ref, mask, 0.2)
    reads_padding({junk: kl_penalty_rewards(scores, with_junk(logprobs, mask, v), with_junk(ref, mask, -v), mask, 0.2)
                   for junk, v in JUNK.items()}, reference, "kl_penalty_rewards")


def test_kl_penalty_does_not_change_its_inputs():
    scores, logprobs, ref, mask = inputs(53)
    args = {"scores": scores, "logprobs": with_junk(logprobs, mask, 2.0), "ref_logprobs": with_junk(ref, mask, 2.0),
            "mask": mask}
    before = {k: v.clone() for k, v in args.items()}
    kl_penalty_rewards(*args.values(), 0.1)
    unchanged(before, args, "kl_penalty_rewards")
