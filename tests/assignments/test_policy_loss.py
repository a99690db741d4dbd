"""Assignment policy_loss (nanorlhf/ppo.py): PPO's clipped surrogate by hand, its gradient and stats.
docs/design.md details 3 and 7: ratio exactly 1 and approx-KL 0 when logprobs are aligned; clip 0.2."""
import math

import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import masked_mean, policy_loss
from teach import JUNK, close, detached, reads_padding, unchanged, with_junk

T = 5  # columns of ragged_mask()


def test_policy_loss_at_ratio_one():
    g = torch.Generator().manual_seed(5)
    mask = ragged_mask()
    logprobs = -torch.rand(len(LENGTHS), T, generator=g)
    advantages = with_garbage(torch.randn(len(LENGTHS), T, generator=g), mask)
    loss, stats = policy_loss(logprobs, logprobs.clone(), advantages, mask, clip=0.2)
    assert stats["ratio"].item() == 1.0, "ratio must be exactly 1 when logprobs equal old_logprobs"
    assert stats["approx_kl"].item() == 0.0, "approx_kl must be exactly 0 when logprobs equal old_logprobs"
    assert stats["clipfrac"].item() == 0.0, "clipfrac must be 0 when logprobs equal old_logprobs"
    close(loss, -masked_mean(advantages, mask), "loss at ratio 1: minus the mean advantage over real tokens")


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
    close(loss, -0.36, "loss of the hand-computed case")
    close(stats["clipfrac"], 0.4, "clipfrac of the hand-computed case")
    real_ratios = [1.5, 0.5, 1.1, 0.7, 1.5]
    close(stats["ratio"], sum(real_ratios) / 5, "ratio (mean over real tokens)")
    close(stats["approx_kl"], sum(0.5 * math.log(r) ** 2 for r in real_ratios) / 5, "approx_kl")
    loss.backward()
    # d/dlogprob of -A r = -A r (ratio = exp(logprob - old)), divided by 5 real tokens; 0 when clipped or padded
    expected_grad = torch.tensor([[0.0, 0.0, -2.2 / 5, 0.0], [-0.7 / 5, 1.5 / 5, 0.0, 0.0]], dtype=torch.float64)
    close(logprobs.grad, expected_grad, "gradient of the hand-computed case")


# ---------------------------------------------------------------- one test per common bug


def inputs(seed=11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask().to(dtype)
    old = -torch.rand(len(LENGTHS), T, generator=g, dtype=dtype) * 2
    logprobs = old + torch.randn(len(LENGTHS), T, generator=g, dtype=dtype) * 0.4   # ratios well beyond 1 +- 0.3
    advantages = torch.randn(len(LENGTHS), T, generator=g, dtype=dtype)
    return logprobs, old, advantages, mask


def loop_loss(logprobs, old, advantages, clip):
    """(loss, clipfrac) by a python loop over the real tokens."""
    terms, clipped = [], 0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            r = math.exp(logprobs[b, t].item() - old[b, t].item())
            a = advantages[b, t].item()
            unclipped, cut = -a * r, -a * min(max(r, 1 - clip), 1 + clip)
            terms.append(max(unclipped, cut))
            clipped += cut > unclipped
    return sum(terms) / len(terms), clipped / len(terms)


@pytest.mark.parametrize("clip", [0.1, 0.3])
def test_policy_loss_uses_the_clip_it_is_given(clip):
    logprobs, old, advantages, mask = inputs()
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip=clip)
    expected_loss, expected_clipfrac = loop_loss(logprobs, old, advantages, clip)
    close(loss, expected_loss, f"loss with clip={clip} (is the clip range hard-coded?)")
    close(stats["clipfrac"], expected_clipfrac, f"clipfrac with clip={clip} (is the clip range hard-coded?)")


def test_policy_loss_takes_the_pessimistic_max_of_the_two_terms():
    # one token, A = 1, ratio 1.5, clip 0.2: max(-1.5, -1.2) = -1.2 (min would give -1.5)
    loss, _ = policy_loss(torch.tensor([[math.log(1.5)]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    close(loss, -1.2, "loss of one token, A=1, ratio 1.5, clip 0.2: the larger (pessimistic) of -A*r and "
                      "-A*clip(r) (min instead of max, or the sign?)")


def test_policy_loss_ratio_is_new_over_old():
    # ratio = exp(logprobs - old_logprobs) = 1.1 inside the clip range: loss -A*1.1
    loss, stats = policy_loss(torch.tensor([[math.log(1.1)]]), torch.zeros(1, 1), torch.ones(1, 1) * 2,
                              torch.ones(1, 1), 0.2)
    close(stats["ratio"], 1.1, "ratio: exp(logprobs - old_logprobs), new over old")
    close(loss, -2.2, "loss of one token, A=2, ratio 1.1")


def test_policy_loss_gradient_flows_through_unclipped_tokens_only():
    logprobs, old, advantages, mask = inputs(12)
    logprobs = logprobs.clone().requires_grad_()
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    loss.backward()
    n = sum(LENGTHS)
    for b, L in enumerate(LENGTHS):
        for t in range(T):
            r = math.exp(logprobs[b, t].item() - old[b, t].item())
            a = advantages[b, t].item()
            cut = -a * min(max(r, 0.8), 1.2) > -a * r
            expected = 0.0 if t >= L or cut else -a * r / n
            close(logprobs.grad[b, t], expected, f"gradient at token {(b, t)}"
                  + (" (padding: no gradient)" if t >= L else " (clipped: no gradient)" if cut else
                     " (unclipped: -A*ratio/n, the clip must apply to one term only)"))


def test_policy_loss_is_a_mean_over_real_tokens():
    logprobs, old, advantages, mask = inputs(13)
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    close(loss, loop_loss(logprobs, old, advantages, 0.2)[0], "loss: the mean over real tokens only "
                                                                "(a mean over padding too divides by too many)")


def test_policy_loss_never_reads_the_padding():
    logprobs, old, advantages, mask = inputs(14)
    reference = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    outs = {}
    for junk, value in JUNK.items():
        loss, stats = policy_loss(with_junk(logprobs, mask, value), with_junk(old, mask, -value),
                                  with_junk(advantages, mask, value), mask, clip=0.2)
        outs[junk] = (loss, *stats.values())
    reads_padding(outs, (reference[0], *reference[1].values()), "policy_loss")


def test_policy_loss_statistics_are_detached():
    logprobs, old, advantages, mask = inputs(15)
    _, stats = policy_loss(logprobs.clone().requires_grad_(), old, advantages, mask, clip=0.2)
    assert set(stats) == {"clipfrac", "approx_kl", "ratio"}, f"stats keys {sorted(stats)}"
    detached(stats, "policy_loss statistics")


def test_policy_loss_does_not_change_its_inputs():
    logprobs, old, advantages, mask = inputs(16)
    args = {"logprobs": with_junk(logprobs, mask, 7.0), "old_logprobs": with_junk(old, mask, 7.0),
            "advantages": with_junk(advantages, mask, 7.0), "mask": mask}
    before = {k: v.clone() for k, v in args.items()}
    policy_loss(*args.values(), clip=0.2)
    unchanged(before, args, "policy_loss")


def test_policy_loss_clipfrac_counts_only_tokens_whose_gradient_is_cut():
    # ratio 0.7 with A > 0 is outside the range but unclipped (its term is the larger); ratio 1.5 with A > 0 is cut
    logprobs = torch.tensor([[math.log(0.7), math.log(1.5)]], dtype=torch.float64)
    _, stats = policy_loss(logprobs, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                           torch.ones(1, 2, dtype=torch.float64), 0.2)
    close(stats["clipfrac"], 0.5, "clipfrac: the fraction of tokens where the clipped term is the larger "
                                  "(not every token outside the range)")


def test_policy_loss_approx_kl_is_half_the_squared_log_ratio():
    logprobs, old, advantages, mask = inputs(17)
    _, stats = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    terms = [0.5 * (logprobs[b, t].item() - old[b, t].item()) ** 2 for b, n in enumerate(LENGTHS) for t in range(n)]
    close(stats["approx_kl"], sum(terms) / len(terms), "approx_kl: masked mean of 0.5 * (logprobs - old)^2")


def test_policy_loss_float32_stats_of_float64_inputs_pass():
    # the dtype rule: a statistic may come back in float32; it is compared at float32's tolerance
    logprobs, old, advantages, mask = inputs(18)
    _, stats = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    close(stats["clipfrac"].float(), loop_loss(logprobs, old, advantages, 0.2)[1], "clipfrac")


def test_policy_loss_float32_inputs():
    logprobs, old, advantages, mask = inputs(19, torch.float32)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip=0.2)
    assert loss.dtype == torch.float32, \
        f"loss of float32 inputs came back as {loss.dtype}: compute in the inputs' dtype"
    close(loss, loop_loss(logprobs.double(), old.double(), advantages.double(), 0.2)[0], "loss of float32 inputs")
