"""Checks shared by the assignments' tests, each failing with a sentence that names the mistake
(what `python -m nanorlhf.assignments check` shows), not only "Tensor-likes are not close!".

The dtype rule (docs/assignments.md, "Tolerances"): a piece computes in the dtype of its inputs, and a
result is compared at the tolerance of the coarser of its own dtype and the expected one's, so a float32
statistic of float64 inputs passes at float32's tolerance."""
import math

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# what the padding may hold: a piece must never read it, so the result is the same for each
JUNK = {"finite junk": 1e6, "inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def tolerance(*values):
    """The coarser tolerance of the dtypes of the tensors among values (python numbers count as float64)."""
    return max(TOLERANCE.get(v.dtype, 1e-5) if torch.is_tensor(v) else TOLERANCE[torch.float64] for v in values)


def close(actual, expected, what):
    """actual == expected at the dtype rule's tolerance, or an AssertionError that says what differs."""
    tol = tolerance(actual, expected)
    a = actual.detach().double() if torch.is_tensor(actual) else torch.tensor(float(actual), dtype=torch.float64)
    e = expected.detach().double() if torch.is_tensor(expected) else torch.tensor(float(expected), dtype=torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    ok = torch.isclose(a, e, rtol=tol, atol=tol, equal_nan=False)
    if not bool(ok.all()):
        where = (~ok).nonzero()[0].tolist() if a.dim() else []
        at = f" at {tuple(where)}" if where else ""
        raise AssertionError(f"{what}{at}: got {a[tuple(where)].item() if where else a.item():.6g}, "
                             f"expected {e[tuple(where)].item() if where else e.item():.6g}")


def with_junk(x, mask, value):
    """x with value on the padding (mask 0)."""
    return torch.where(mask > 0, x, torch.full_like(x, value))


def reads_padding(results, reference, what):
    """results: {junk name: the output with that junk in the padding}; each must equal reference on the
    real tokens and be finite there."""
    for junk, out in results.items():
        outs = out if isinstance(out, (tuple, list)) else (out,)
        refs = reference if isinstance(reference, (tuple, list)) else (reference,)
        for o, r in zip(outs, refs):
            if not bool(torch.isfinite(o).all()) and bool(torch.isfinite(r).all()):
                raise AssertionError(f"{what} reads values from the padding: with {junk} there the result holds "
                                     f"inf/nan (mask with torch.where or masked_mean, not by multiplying by the mask)")
            if not torch.equal(o, r):
                raise AssertionError(f"{what} reads values from the padding: the result changes with {junk} there")


def detached(stats, what="statistics"):
    for key, value in stats.items():
        assert torch.is_tensor(value), f"{what}: {key} must be a 0-dim tensor, got {type(value).__name__}"
        assert not value.requires_grad, (f"{what} must not carry a gradient: {key} requires grad (compute it "
                                         f"under torch.no_grad() or .detach() it)")
        assert value.dim() == 0, f"{what}: {key} must be a 0-dim tensor, got shape {tuple(value.shape)}"


def unchanged(before, after, what):
    """before: clones of the inputs taken before the call; after: the inputs after it."""
    for name, b in before.items():
        a = after[name]
        same = torch.equal(a, b) or bool(torch.isnan(a).eq(torch.isnan(b)).all() and
                                         torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
        assert same, f"{what} changed its input {name} in place: work on a copy (torch.where, not masked_fill_ etc.)"
