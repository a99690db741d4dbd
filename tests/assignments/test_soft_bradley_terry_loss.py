"""Assignment soft_bradley_terry_loss (nanorlhf/reward.py): Bradley-Terry against soft labels p = P(chosen
wins) (Constitutional AI, Bai et al. 2022): -(p log sigmoid(d) + (1 - p) log sigmoid(-d)), d = r_c - r_r."""
import math

import pytest
import torch

from nanorlhf.reward import soft_bradley_terry_loss
from teach import close, unchanged


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def by_hand(d, p):
    return -(p * log_sigmoid(d) + (1 - p) * log_sigmoid(-d))


R_C = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
R_R = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
P = torch.tensor([0.9, 0.7, 0.2], dtype=torch.float64)


def test_soft_bt_loss_by_hand():
    r_c = R_C.clone().requires_grad_(True)
    loss = soft_bradley_terry_loss(r_c, R_R, P)
    close(loss, sum(by_hand(d, p) for d, p in zip((1.0, -1.0, 0.0), P.tolist())) / 3,
          "the mean of -(p log sigmoid(d) + (1 - p) log sigmoid(-d))")
    loss.backward()
    # d loss / d r_c = (sigmoid(d) - p) / B
    close(r_c.grad, (torch.sigmoid(R_C - R_R) - P) / 3, "the gradient with respect to r_chosen, (sigmoid(d) - p) / B")


def test_soft_bt_targets_are_used():
    loss = soft_bradley_terry_loss(torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                                   torch.tensor([0.5], dtype=torch.float64))
    close(loss, by_hand(2.0, 0.5), "a soft label 0.5 (a tie) must change the loss: weigh log sigmoid(d) by p and "
          "log sigmoid(-d) by 1 - p, not the hard-label loss")


def test_soft_bt_target_is_the_probability_chosen_wins():
    loss = soft_bradley_terry_loss(torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64),
                                   torch.tensor([0.9], dtype=torch.float64))
    close(loss, by_hand(2.0, 0.9), "the target p is P(chosen beats rejected): p goes with log sigmoid(r_c - r_r), "
          "1 - p with log sigmoid(r_r - r_c) (they are swapped)")


def test_soft_bt_equals_bradley_terry_at_hard_labels():
    close(soft_bradley_terry_loss(R_C, R_R, torch.ones(3, dtype=torch.float64)),
          sum(-log_sigmoid(d) for d in (1.0, -1.0, 0.0)) / 3, "at targets 1 the loss is -log sigmoid(r_c - r_r)")


def test_soft_bt_large_margins_stay_finite():
    loss = soft_bradley_terry_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]), torch.tensor([0.9, 0.1]))
    assert math.isfinite(loss.item()), "a margin of +-200 overflowed: log(sigmoid(x)) is -inf there, use F.logsigmoid"
    assert loss.item() == pytest.approx((0.9 * 200 + 0.9 * 200) / 2, rel=1e-4)


def test_soft_bt_weights_are_used():
    loss = soft_bradley_terry_loss(R_C[:2], R_R[:2], P[:2], torch.tensor([0.0, 1.0], dtype=torch.float64))
    close(loss, by_hand(-1.0, 0.7), "with weights (0, 1) the loss is the second pair's alone: weigh each pair's loss")


def test_soft_bt_weights_normalised_by_their_sum():
    a = soft_bradley_terry_loss(R_C, R_R, P, torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64))
    b = soft_bradley_terry_loss(R_C, R_R, P, torch.tensor([0.5, 1.5, 1.0], dtype=torch.float64))
    close(a, b, "scaling every weight must not change the loss: divide by sum(weights)")


def test_soft_bt_does_not_change_its_inputs():
    r_c, r_r, p, w = R_C.clone(), R_R.clone(), P.clone(), torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    before = {"r_chosen": r_c.clone(), "r_rejected": r_r.clone(), "targets": p.clone(), "weights": w.clone()}
    soft_bradley_terry_loss(r_c, r_r, p, w)
    unchanged(before, {"r_chosen": r_c, "r_rejected": r_r, "targets": p, "weights": w}, "soft_bradley_terry_loss")
