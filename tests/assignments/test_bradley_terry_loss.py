"""Assignment bradley_terry_loss (nanorlhf/reward.py): the reward model's pairwise loss by hand,
its gradient, the weighted mean and its stability at large margins."""
import math

import pytest
import torch

from nanorlhf.reward import bradley_terry_loss


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_loss_by_hand():
    r_c = torch.tensor([1.0, -0.5, 2.0], requires_grad=True)
    r_r = torch.tensor([0.0, 0.5, 2.0])
    # -log sigmoid(d) = log(1 + exp(-d)) for d = 1, -1, 0
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)) + math.log(2)) / 3
    loss = bradley_terry_loss(r_c, r_r)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d loss / d r_c = -(1 - sigmoid(r_c - r_r)) / B
    expected_grad = [-(1 - sigmoid(d)) / 3 for d in (1.0, -1.0, 0.0)]
    assert r_c.grad.tolist() == pytest.approx(expected_grad, abs=1e-6)


def test_bradley_terry_loss_weighted_and_stable():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    weights = torch.tensor([1.0, 3.0])
    expected = (1 * math.log(1 + math.exp(-1)) + 3 * math.log(1 + math.exp(1))) / 4
    assert bradley_terry_loss(r_c, r_r, weights).item() == pytest.approx(expected, abs=1e-6)
    assert bradley_terry_loss(r_c, r_r, torch.ones(2)).item() == pytest.approx(bradley_terry_loss(r_c, r_r).item())
    # large margins stay finite: log(1 + e^200) = 200 (no overflow to inf)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)


# ---------------------------------------------------------------- one test per common bug

def test_bradley_terry_margin_is_chosen_minus_rejected():
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6), \
        "a pair the model already ranks right (r_c - r_r = 2) must have a small loss: -log sigmoid(r_c - r_r)"


def test_bradley_terry_large_margins_stay_finite():
    loss = bradley_terry_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]))
    assert math.isfinite(loss.item()), "a margin of -200 overflowed: log(sigmoid(x)) is inf there, use F.logsigmoid"
    assert loss.item() == pytest.approx(100.0, abs=1e-4)


def test_bradley_terry_weights_are_used():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    uneven = bradley_terry_loss(r_c, r_r, torch.tensor([0.0, 1.0])).item()
    assert uneven == pytest.approx(math.log(1 + math.exp(1)), abs=1e-6), \
        "with weights (0, 1) the loss is the second pair's alone: weigh each pair's loss"


def test_bradley_terry_weights_normalised_by_their_sum():
    r_c, r_r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    a = bradley_terry_loss(r_c, r_r, torch.tensor([1.0, 3.0])).item()
    b = bradley_terry_loss(r_c, r_r, torch.tensor([0.25, 0.75])).item()
    assert a == pytest.approx(b, abs=1e-6), "scaling every weight must not change the loss: divide by sum(weights)"


def test_bradley_terry_does_not_change_its_inputs():
    r_c, r_r, w = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([1.0, 3.0])
    before = [r_c.clone(), r_r.clone(), w.clone()]
    bradley_terry_loss(r_c, r_r, w)
    assert all(torch.equal(a, b) for a, b in zip(before, (r_c, r_r, w))), \
        "bradley_terry_loss changed its inputs in place: work on copies"
