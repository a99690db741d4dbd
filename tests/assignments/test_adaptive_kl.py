"""Assignment adaptive_kl (nanorlhf/ppo.py): AdaptiveKLController.update by hand.
docs/design.md detail 8: target 6 nats, horizon 10 000, proportional error clipped to +-0.2."""
import pytest
import torch

from nanorlhf.ppo import AdaptiveKLController


def test_adaptive_kl_controller():
    kl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    kl.update(7.0, n_steps=100)                      # error 7/6 - 1 = 1/6, inside the clip
    assert kl.value == pytest.approx(0.1 * (1 + (1 / 6) * 100 / 10000), rel=1e-12)
    before = kl.value
    kl.update(600.0, n_steps=256)                    # 100x target: error clipped at +0.2
    assert kl.value == pytest.approx(before * (1 + 0.2 * 256 / 10000), rel=1e-12)
    before = kl.value
    kl.update(0.0, n_steps=256)                      # far below: error clipped at -0.2
    assert kl.value == pytest.approx(before * (1 - 0.2 * 256 / 10000), rel=1e-12)
    before = kl.value
    kl.update(torch.tensor(6.0), n_steps=256)        # on target (a tensor works too): unchanged
    assert kl.value == before and type(kl.value) is float   # a plain float, as checkpoints store it
    kl.update(3.0, n_steps=64)                       # below target lowers it
    assert kl.value < before


def test_kl_controller_state_round_trip():
    kl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    kl.update(12.0, 512)
    state = kl.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(1.0, target=1.0, horizon=1.0)
    resumed.load_state_dict(state)
    kl.update(9.0, 512)
    resumed.update(9.0, 512)
    assert resumed.value == kl.value and resumed.state_dict() == kl.state_dict()
