"""Assignment value_loss (nanorlhf/ppo.py): the clipped value loss by hand and its gradient.
docs/design.md detail 7: value clipping at 0.2 around the values of the rollout."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import value_loss

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
    assert loss.item() == pytest.approx(0.55375, abs=1e-12)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5, abs=1e-12)
    loss.backward()
    # d/dV 0.5 * (V-R)^2 / 4 = (V-R) / 4 on unclipped real tokens
    expected_grad = torch.tensor([[0.0, -0.5 / 4, 0.0], [2.0 / 4, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(values.grad, expected_grad, rtol=0, atol=1e-12)


def test_value_loss_inside_the_clip_range_is_half_the_mse_over_real_tokens():
    # |V - V_old| < clip everywhere: V_clip = V, so the loss is 0.5 * mean over real tokens of (V - R)^2
    g = torch.Generator().manual_seed(8)
    mask = ragged_mask()
    old_values = torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64)
    values = old_values + (torch.rand(len(LENGTHS), T, generator=g, dtype=torch.float64) - 0.5) * 0.3
    returns = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 2, mask)
    loss, stats = value_loss(with_garbage(values, mask, -1e6), old_values, returns, mask, clip=0.2)
    squares = [(values[b, t].item() - returns[b, t].item()) ** 2 for b, n in enumerate(LENGTHS) for t in range(n)]
    assert loss.item() == pytest.approx(0.5 * sum(squares) / len(squares), abs=1e-12)
    assert stats["value_clipfrac"].item() == 0.0
