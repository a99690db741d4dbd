"""Assignment masked_whiten (nanorlhf/ppo.py): whitening over real tokens only, against the formula
on the real entries alone. docs/design.md detail 6: advantages are whitened over real tokens only."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import masked_mean, masked_var, masked_whiten

T = 5  # columns of ragged_mask()


def test_masked_whiten_ignores_padding():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask()
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
    mask = ragged_mask()
    x = with_garbage(torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * 3 + 2, mask)
    y = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(y, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-9)
    assert masked_var(y, mask, unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    assert (y[mask == 0] == 0).all()
