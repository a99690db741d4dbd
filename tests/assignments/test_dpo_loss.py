"""Assignment dpo_loss (nanorlhf/dpo.py): the DPO loss against hand-computed values, the closed
form per row, its value at the reference policy and the signs of its gradient."""
import math

import pytest
import torch

from nanorlhf.dpo import dpo_loss


def test_dpo_loss_hand_computed():
    # beta 0.1; chosen: policy -10, ref -11 -> log-ratio +1; rejected: policy -12, ref -11 -> -1
    # margin = 1 - (-1) = 2; loss = -log sigmoid(0.1 * 2) = log(1 + exp(-0.2)); rewards 0.1, -0.1
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1)
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.1, abs=1e-6)
    assert rejected_rewards.item() == pytest.approx(-0.1, abs=1e-6)


def test_dpo_loss_is_log2_when_policy_is_reference():
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(6, generator=g, dtype=torch.float64) * 50
    rejected = -torch.rand(6, generator=g, dtype=torch.float64) * 50
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.5)
    assert (losses == math.log(2)).all()
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 5.0])
def test_dpo_loss_closed_form(beta):
    # loss = log(1 + exp(-beta * m)), m = (pc - rc) - (pr - rr), computed per row in python
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-torch.rand(8, generator=g, dtype=torch.float64) * 30 for _ in range(4))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(8):
        m = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(math.log1p(math.exp(-beta * m)), rel=1e-12, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), abs=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), abs=1e-12)


def test_dpo_loss_gradient_signs_and_detached_rewards():
    pc = torch.tensor([-5.0, -20.0], requires_grad=True)
    pr = torch.tensor([-6.0, -3.0], requires_grad=True)
    rc, rr = torch.tensor([-5.5, -19.0]), torch.tensor([-6.5, -4.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    losses.sum().backward()
    assert (pc.grad < 0).all()     # raising the chosen logp lowers the loss
    assert (pr.grad > 0).all()     # raising the rejected logp raises it
    # d loss / d pc = -beta * sigmoid(-beta * m)
    m = (pc - rc) - (pr - rr)
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-0.1 * m.detach()))


# ---------------------------------------------------------------- one test per common bug

def test_dpo_loss_beta_multiplies_both_sides():
    # chosen log-ratio 0, rejected log-ratio -4, beta 0.5: loss = -log sigmoid(0.5 * 4) = log(1 + e^-2)
    losses, _, _ = dpo_loss(torch.tensor([-3.0]), torch.tensor([-9.0]), torch.tensor([-3.0]), torch.tensor([-5.0]), 0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-2.0)), abs=1e-6), \
        "DPO loss with a rejected log-ratio of -4, beta 0.5: beta multiplies the whole margin"


def test_dpo_loss_uses_the_beta_it_is_given():
    losses, chosen, _ = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
                                 0.3)
    assert chosen.item() == pytest.approx(0.3, abs=1e-6), "chosen reward with beta 0.3: beta * (policy - ref)"
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.3)), abs=1e-6), "DPO loss with beta 0.3"


def test_dpo_loss_prefers_the_chosen_response():
    losses, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-10.0]), torch.tensor([-5.0]), torch.tensor([-5.0]), 1.0)
    assert losses.item() < 1e-3, "a policy that already prefers the chosen response must have a small loss: " \
                                 "chosen minus rejected, not the reverse"


def test_dpo_loss_rewards_are_detached():
    pc = torch.tensor([-5.0], requires_grad=True)
    _, chosen, rejected = dpo_loss(pc, pc * 2, torch.tensor([-4.0]), torch.tensor([-9.0]), 0.1)
    assert not chosen.requires_grad and not rejected.requires_grad, \
        "the returned rewards must not carry a gradient (they are for logging): .detach() them"


def test_dpo_loss_large_margins_stay_finite():
    losses, _, _ = dpo_loss(torch.tensor([-500.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert math.isfinite(losses.item()), "a margin of -500 overflowed: use F.logsigmoid, not log(sigmoid(x))"
