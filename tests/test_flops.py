"""nanorlhf/flops.py and nanorlhf/benchmark.py: the FLOP count against a hand count, and both benchmarks run on
the tiny preset on CPU and return sensible numbers."""
import math

import pytest
import torch

from nanorlhf.benchmark import bench_pg, bench_ppo, bench_sft
from nanorlhf.flops import model_flops_per_token, peak_flops, training_speed
from nanorlhf.model import GPTConfig


def test_model_flops_per_token_by_hand():
    V, T, L, C = 23, 32, 2, 16
    # per block: 2 LayerNorms (4C), c_attn (3C^2 + 3C), attn c_proj (C^2 + C), c_fc (4C^2 + 4C),
    # mlp c_proj (4C^2 + C) = 12 C^2 + 13 C; then wte (V C, also the LM head) and ln_f (2C); wpe not counted
    n = L * (12 * C * C + 13 * C) + V * C + 2 * C
    assert n == 6960
    config = GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=C)
    assert model_flops_per_token(config, T) == 6 * n + 12 * L * C * T


def test_training_speed_by_hand():
    """train_sft.py's tok_per_s and mfu: two micro-batches of different widths in 2 s on a 1 MFLOP/s chip."""
    config = GPTConfig(vocab_size=23, block_size=32, n_layer=2, n_head=2, n_embd=16)
    f = lambda T: 6 * 6960 + 12 * 2 * 16 * T  # FLOPs per token, counted by hand above
    tokens_per_s, mfu = training_speed(config, [(2, 5), (3, 7)], 2.0, peak=1e6)
    assert tokens_per_s == (2 * 5 + 3 * 7) / 2.0
    assert math.isclose(mfu, (2 * 5 * f(5) + 3 * 7 * f(7)) / 2.0 / 1e6, rel_tol=1e-12)
    assert training_speed(config, [(2, 5)], 1.0)[1] is None  # no peak known, no MFU


def test_bench_sft_trains_with_the_presets_dropout():
    # what train_sft.py would train with: the tiny preset keeps SFTConfig's dropout
    assert bench_sft("tiny", "cpu", torch.float32, steps=1, warmup=0)["dropout"] == 0.1
    assert bench_sft("tiny", "cpu", torch.float32, steps=1, warmup=0, dropout=0.0)["dropout"] == 0.0


def test_bench_sft_on_tiny_cpu():
    out = bench_sft("tiny", "cpu", torch.float32, steps=2, warmup=1)
    assert out["batch_size"] == 8 and out["seq_len"] == 96
    assert out["tokens_per_s"] > 0 and out["tflops"] > 0 and out["peak_mem_gb"] > 0
    # tokens/s and FLOP/s are one measurement: FLOP/s = tokens/s x FLOPs per token
    assert math.isclose(out["tflops"] * 1e12 / out["tokens_per_s"], out["flops_per_token"], rel_tol=1e-9)
    assert out["mfu"] is None and peak_flops(torch.device("cpu"), torch.float32) is None  # no MFU on CPU


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_bench_ppo_and_pg_on_tiny_cpu(algo):
    out = bench_ppo("tiny", "cpu", torch.float32) if algo == "ppo" else bench_pg("tiny", "cpu", torch.float32, algo)
    for phase in ("rollout_s", "score_s", "ref_value_s", "learn_s"):
        assert out[phase] > 0, phase
    assert math.isclose(out["total_s"], sum(out[p] for p in ("rollout_s", "score_s", "ref_value_s", "learn_s")))
    assert 0 < out["response_tokens"] <= out["rollout_batch"] * out["max_new_tokens"]
    assert out["rollout_tokens_per_s"] > 0 and out["peak_mem_gb"] > 0
