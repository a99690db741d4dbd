"""Assignment value_loss (nanorlhf/ppo.py): the clipped value loss by hand and its gradient.
docs/design.md detail 7: value clipping at 0.2 around the values of the rollout."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import value_loss
from teach import JUNK, close, detached, reads_padding, unchanged, with_junk

T = 5  # columns of ragged_mask()


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
    close(loss, 0.55375, "value loss of the hand-computed case")
    close(stats["value_clipfrac"], 0.5, "value_clipfrac of the hand-computed case")
    loss.backward()
    # d/dV 0.5 * (V-R)^2 / 4 = (V-R) / 4 on unclipped real tokens
    expected_grad = torch.tensor([[0.0, -0.5 / 4, 0.0], [2.0 / 4, 0.0, 0.0]], dtype=torch.float64)
    close(values.grad, expected_grad, "gradient of the hand-computed case (0 on clipped tokens and padding)")


def test_value_loss_inside_the_clip_range_is_half_the_mse_over_real_tokens():
    # |V - V_old| < clip everywhere: V_clip = V, so the loss is 0.5 * mean over real tokens of (V - R)^2
    g = torch.Generator().manual_seed(8)
    mask = ragged_mask()
    old_values = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    values = old_values + (torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) - 0.5) * 0.3
    returns = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2, mask)
    loss, stats = value_loss(with_garbage(values, mask, -1e6), old_values, returns, mask, clip=0.2)
    squares = [(values[b, t].item() - returns[b, t].item()) ** 2 for b, n in enumerate(LENGTHS) for t in range(n)]
    close(loss, 0.5 * sum(squares) / len(squares), "value loss inside the clip range")
    assert stats["value_clipfrac"].item() == 0.0


# ---------------------------------------------------------------- one test per common bug

def inputs(seed=21, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask().to(dtype)
    old = torch.randn(len(LENGTHS), T, generator=g, dtype=dtype)
    values = old + torch.randn(len(LENGTHS), T, generator=g, dtype=dtype) * 0.4   # many beyond +-0.3 of old
    returns = torch.randn(len(LENGTHS), T, generator=g, dtype=dtype)
    return values, old, returns, mask


def loop_value_loss(values, old, returns, clip):
    terms, clipped = [], 0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            v, o, r = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            v_clip = o + min(max(v - o, -clip), clip)
            terms.append(max((v - r) ** 2, (v_clip - r) ** 2))
            clipped += (v_clip - r) ** 2 > (v - r) ** 2
    return 0.5 * sum(terms) / len(terms), clipped / len(terms)


@pytest.mark.parametrize("clip", [0.1, 0.35])
def test_value_loss_uses_the_clip_it_is_given(clip):
    values, old, returns, mask = inputs()
    loss, stats = value_loss(values, old, returns, mask, clip=clip)
    expected, clipfrac = loop_value_loss(values, old, returns, clip)
    close(loss, expected, f"value loss with clip={clip} (is the clip range hard-coded?)")
    close(stats["value_clipfrac"], clipfrac, f"value_clipfrac with clip={clip}")


def test_value_loss_clips_around_the_old_values():
    # V_old = 5, V = 5.5, R = 6, clip 0.2: V_clip = 5.2, max(0.25, 0.64) = 0.64 -> loss 0.32
    # (clipping V itself to [-0.2, 0.2] would give 0.5 * (6 - 0.2)^2)
    loss, _ = value_loss(torch.tensor([[5.5]]), torch.tensor([[5.0]]), torch.tensor([[6.0]]), torch.ones(1, 1), 0.2)
    close(loss, 0.32, "value loss of V=5.5, V_old=5, R=6: the clip is V_old +- clip, not [-clip, clip]")


def test_value_loss_takes_the_larger_squared_error():
    # V_old = 0, V = 1, R = 0.5, clip 0.2: V_clip = 0.2, max(0.25, 0.09) = 0.25 -> 0.125 (min would give 0.045)
    loss, _ = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[0.5]]), torch.ones(1, 1), 0.2)
    close(loss, 0.125, "value loss of V=1, V_old=0, R=0.5: the larger of the two squared errors (max, not min)")


def test_value_loss_is_half_the_squared_error():
    loss, _ = value_loss(torch.tensor([[0.1]]), torch.tensor([[0.0]]), torch.tensor([[2.1]]), torch.ones(1, 1), 0.2)
    close(loss, 2.0, "value loss of V=0.1, R=2.1 inside the clip range: 0.5 * (V - R)^2 (the 0.5, a square)")


def test_value_loss_is_a_mean_over_real_tokens():
    values, old, returns, mask = inputs(22)
    loss, _ = value_loss(values, old, returns, mask, clip=0.2)
    close(loss, loop_value_loss(values, old, returns, 0.2)[0], "value loss: the mean over real tokens only")


def test_value_loss_never_reads_the_padding():
    values, old, returns, mask = inputs(23)
    reference = value_loss(values, old, returns, mask, clip=0.2)
    outs = {}
    for junk, value in JUNK.items():
        loss, stats = value_loss(with_junk(values, mask, value), with_junk(old, mask, -value),
                                 with_junk(returns, mask, value), mask, clip=0.2)
        outs[junk] = (loss, *stats.values())
    reads_padding(outs, (reference[0], *reference[1].values()), "value_loss")


def test_value_loss_statistics_are_detached():
    values, old, returns, mask = inputs(24)
    _, stats = value_loss(values.clone().requires_grad_(), old, returns, mask, clip=0.2)
    assert set(stats) == {"value_clipfrac"}, f"stats keys {sorted(stats)}"
    detached(stats, "value_loss statistics")


def test_value_loss_does_not_change_its_inputs():
    values, old, returns, mask = inputs(25)
    args = {"values": with_junk(values, mask, 3.0), "old_values": with_junk(old, mask, 3.0),
            "returns": with_junk(returns, mask, 3.0), "mask": mask}
    before = {k: v.clone() for k, v in args.items()}
    value_loss(*args.values(), clip=0.2)
    unchanged(before, args, "value_loss")
