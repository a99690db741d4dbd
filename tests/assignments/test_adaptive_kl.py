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


# ---------------------------------------------------------------- one test per common bug

def test_adaptive_kl_error_is_clipped():
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(60.0, n_steps=1000)  # error 9, clipped to 0.2
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1), rel=1e-12), \
        f"beta after a KL 10x the target: the error must be clipped to +0.2 (got beta {kl.value})"


def test_adaptive_kl_beta_rises_above_target_and_falls_below():
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(9.0, n_steps=500)
    assert kl.value > 0.1, "beta must rise when the KL is above target (the sign of the error)"
    high = kl.value
    kl.update(3.0, n_steps=500)
    assert kl.value < high, "beta must fall when the KL is below target"


def test_adaptive_kl_step_scales_with_n_steps_over_horizon():
    kl = AdaptiveKLController(1.0, target=1.0, horizon=100.0)
    kl.update(1.1, n_steps=50)  # error 0.1, step 0.1 * 50 / 100 = 0.05
    assert kl.value == pytest.approx(1.05, rel=1e-12), \
        f"beta after error 0.1, n_steps 50, horizon 100: 1 + error * n_steps / horizon = 1.05 (got {kl.value})"


def test_adaptive_kl_update_is_multiplicative():
    kl = AdaptiveKLController(3.0, target=1.0, horizon=100.0)
    kl.update(1.1, n_steps=50)
    assert kl.value == pytest.approx(3.15, rel=1e-12), \
        f"beta 3 after a step of 0.05: beta * (1 + 0.05) = 3.15 (got {kl.value})"


def test_adaptive_kl_beta_stays_a_python_float():
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(torch.tensor(6.6), n_steps=64)  # error 0.1, inside the clip
    assert type(kl.value) is float, (f"beta must stay a Python float (it became {type(kl.value).__name__}): "
                                     "float() the KL you are given, checkpoints store plain floats")
    kl.update(torch.tensor(5.4, dtype=torch.float64), n_steps=64)
    assert type(kl.value) is float, "beta must stay a Python float"


def test_adaptive_kl_kl_of_zero():
    kl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(0.0, n_steps=100)  # error -1, clipped to -0.2
    assert kl.value == pytest.approx(0.1 * (1 - 0.2 * 0.01), rel=1e-12), \
        f"beta after a KL of 0: error KL / target - 1 = -1, clipped to -0.2 (got {kl.value})"
