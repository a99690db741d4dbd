"""Assignment kl_k3 (nanorlhf/pg.py): Schulman's k3 estimator of KL(pi || pi_ref) from one sample,
k3 = (r - 1) - log r with log r = ref_logprobs - logprobs, by hand, its sign, direction and gradient."""
import math

import torch

from nanorlhf.pg import kl_k3
from teach import close, unchanged


def k3_by_hand(logprob, ref_logprob):
    log_r = ref_logprob - logprob
    return math.exp(log_r) - 1 - log_r


def test_kl_k3_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    expected = torch.tensor([[k3_by_hand(a, b) for a, b in zip(lp[0].tolist(), ref[0].tolist())]], dtype=torch.float64)
    close(kl_k3(lp, ref), expected, "k3 = (r - 1) - log r, log r = ref_logprobs - logprobs")


def test_kl_k3_log_ratio_is_ref_minus_policy():
    # log r = ref - policy = +1 here: k3 = e - 2 (with the other direction it would be 1/e, a different number)
    close(kl_k3(torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)),
          torch.tensor([math.e - 2], dtype=torch.float64),
          "k3 uses log r = ref_logprobs - logprobs (the reference over the policy), not logprobs - ref_logprobs")


def test_kl_k3_is_never_negative():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    k3 = kl_k3(lp, ref)
    assert bool((k3 >= 0).all()), "k3 = (r - 1) - log r is >= 0 on every sample: a negative value means its sign is flipped"
    assert bool((k3 > 0).any()), "k3 is positive where the policy and the reference differ"


def test_kl_k3_is_zero_where_the_policies_agree():
    lp = torch.tensor([[-0.3, -4.0, -1e-3]], dtype=torch.float64)
    close(kl_k3(lp, lp.clone()), torch.zeros_like(lp),
          "k3 where policy and reference agree (r = 1) must be 0: (r - 1) - log r, not r - log r")


def test_kl_k3_carries_the_gradient():
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    kl_k3(lp, ref).sum().backward()
    assert lp.grad is not None, "k3 carries no gradient to the policy: it is a term of GRPO's loss, do not detach it"
    # d k3 / d logprob = 1 - r
    close(lp.grad, 1 - torch.exp(ref - lp.detach()), "the gradient of k3 with respect to logprobs (1 - r)")


def test_kl_k3_keeps_the_dtype_and_does_not_change_its_inputs():
    lp, ref = torch.tensor([-1.0, -2.0], dtype=torch.float32), torch.tensor([-1.5, -1.0], dtype=torch.float32)
    before = {"logprobs": lp.clone(), "ref_logprobs": ref.clone()}
    out = kl_k3(lp, ref)
    assert out.dtype == torch.float32, f"k3 of float32 inputs must be float32 (the dtype rule), got {out.dtype}"
    unchanged(before, {"logprobs": lp, "ref_logprobs": ref}, "kl_k3")
