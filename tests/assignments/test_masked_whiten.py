"""Assignment masked_whiten (nanorlhf/ppo.py): whitening over real tokens only, against the formula
on the real entries alone. docs/design.md detail 6: advantages are whitened over real tokens only."""
import pytest
import torch

from conftest import RAGGED_LENGTHS as LENGTHS, ragged_mask, with_garbage
from nanorlhf.ppo import masked_mean, masked_var, masked_whiten
from teach import JUNK, close, reads_padding, unchanged, with_junk

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


# ---------------------------------------------------------------- one test per common bug

def real_entries(seed, scale=3.0, shift=2.0):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask()
    return torch.randn(len(LENGTHS), T, generator=g, dtype=torch.float64) * scale + shift, mask


def by_formula(x, mask, eps=1e-8, shift_mean=True):
    real = x[mask > 0]
    out = (real - real.mean()) / torch.sqrt(real.var(unbiased=False) + eps)
    return out if shift_mean else out + real.mean()


def test_masked_whiten_statistics_over_real_tokens_only():
    x, mask = real_entries(31)
    close(masked_whiten(with_junk(x, mask, 0.0), mask)[mask > 0], by_formula(x, mask),
          "whitened real tokens (mean and variance over real tokens only, zeros in the padding must not count)")


def test_masked_whiten_uses_the_biased_variance():
    x = torch.tensor([[1.0, 3.0]], dtype=torch.float64)   # mean 2, biased var 1, unbiased var 2
    close(masked_whiten(x, torch.ones(1, 2, dtype=torch.float64)), torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
          / (1 + 1e-8) ** 0.5, "whiten([1, 3]): the biased variance (divide by n, not n - 1)")


def test_masked_whiten_epsilon_inside_the_square_root():
    # variance 1e-8 on real tokens: sqrt(var + 1e-8) = 1.414e-4 but sqrt(var) + 1e-8 = 1.0001e-4
    x = torch.tensor([[1e-4, -1e-4, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[1e-4, -1e-4, 0.0]], dtype=torch.float64) / (1e-8 + 1e-8) ** 0.5
    close(masked_whiten(x, mask), expected, "whitened tiny-variance input: (x - mean) / sqrt(var + 1e-8), "
                                            "the 1e-8 inside the square root")


def test_masked_whiten_constant_input_stays_finite():
    x = torch.full((2, 3), 5.0, dtype=torch.float64)
    out = masked_whiten(x, torch.ones(2, 3, dtype=torch.float64))
    assert torch.isfinite(out).all(), "whitening a constant gave inf/nan: add 1e-8 to the variance under the root"
    close(out, torch.zeros(2, 3, dtype=torch.float64), "whitened constant")


def test_masked_whiten_zero_on_padding():
    x, mask = real_entries(32)
    out = masked_whiten(with_junk(x, mask, 4.0), mask)
    assert (out[mask == 0] == 0).all(), "the padding of the whitened result must be 0"


def test_masked_whiten_never_reads_the_padding():
    x, mask = real_entries(33)
    reference = masked_whiten(x, mask)
    reads_padding({junk: masked_whiten(with_junk(x, mask, v), mask) for junk, v in JUNK.items()}, reference,
                  "masked_whiten")
    reads_padding({junk: masked_whiten(with_junk(x, mask, v), mask, shift_mean=False) for junk, v in JUNK.items()},
                  masked_whiten(x, mask, shift_mean=False), "masked_whiten(shift_mean=False)")


def test_masked_whiten_adds_the_mean_back_without_shift():
    x, mask = real_entries(34)
    close(masked_whiten(x, mask, shift_mean=False)[mask > 0], by_formula(x, mask, shift_mean=False),
          "whitened with shift_mean=False: the mean is added back")


def test_masked_whiten_does_not_change_its_input():
    x, mask = real_entries(35)
    args = {"x": with_junk(x, mask, 9.0), "mask": mask}
    before = {k: v.clone() for k, v in args.items()}
    masked_whiten(*args.values())
    unchanged(before, args, "masked_whiten")


def test_masked_whiten_float32_input():
    x, mask = real_entries(36)
    out = masked_whiten(x.float(), mask.float())
    assert out.dtype == torch.float32, f"whitened float32 input came back as {out.dtype}"
    close(out[mask > 0], by_formula(x, mask).float(), "whitened float32 input")
