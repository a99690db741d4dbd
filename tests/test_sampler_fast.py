"""nanorlhf/sampler.py speed machinery (CPU): the decode-step modes give eager's tokens, a
static-shape cache (what compile and CUDA graphs use) equals the filled-columns one, the loop
grows no tensors and syncs with the host only every check_every steps, it stops soon after
every row has ended, and the inverse-CDF draw never lands on a token of probability 0."""
import collections
import functools
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO, TINY, left_padded, make_gpt
from nanorlhf import sampler
from nanorlhf.model import response_logprobs
from nanorlhf.sampler import EagerDecodeStep, generate, make_decode_step

EOS = TINY["vocab_size"] - 1
LENGTHS = [4, 1, 6, 3]  # real prompt tokens per row, left padded to 6


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_same_samples(a, b):
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["mask"], b["mask"])
    assert torch.allclose(a["logprobs"], b["logprobs"], atol=1e-5)


class EOSLogit(torch.nn.Module):
    """A GPT with the EOS logit fixed (100: always drawn, -inf: never) that counts its forward calls."""

    def __init__(self, gpt, eos_logit):
        super().__init__()
        self.gpt, self.config, self.eos_logit, self.calls = gpt, gpt.config, eos_logit, 0
        self.inference_mode_seen = set()

    def new_kv_cache(self, *args, **kwargs):
        return self.gpt.new_kv_cache(*args, **kwargs)

    def forward(self, idx, position_ids=None, attention_mask=None, kv_cache=None):
        self.calls += 1
        self.inference_mode_seen.add(torch.is_inference_mode_enabled())
        logits = self.gpt(idx, position_ids, attention_mask, kv_cache).clone()
        logits[..., EOS] = self.eos_logit
        return logits


class StaticCacheStep(EagerDecodeStep):
    """Eager ops on the cache that compile and CUDA graphs use: static shapes, one cache per
    shape, reset and reused across calls as CUDAGraphDecodeStep does (stale columns stay in it)."""

    def __init__(self, model):
        super().__init__(model)
        self.caches = {}

    def new_kv_cache(self, batch_size, max_len, dtype):
        key = (batch_size, max_len)
        if key not in self.caches:
            self.caches[key] = self.model.new_kv_cache(batch_size, max_len, dtype, static_shapes=True)
        self.caches[key].reset()
        return self.caches[key]


# ---------------------------------------------------------------- modes

def test_cuda_graph_mode_falls_back_to_eager_on_cpu(capsys):
    model = make_gpt()
    step = make_decode_step(model, "cuda_graph")
    assert "running eager" in capsys.readouterr().out
    assert type(step) is EagerDecodeStep
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    fast = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(0), decode_step=step)
    assert_same_samples(fast, generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(0)))
    with pytest.raises(ValueError, match="eager | compile | cuda_graph"):
        make_decode_step(model, "graph")


def test_compiled_step_compiles_once_and_matches_eager(monkeypatch):
    # backend="eager" traces with dynamo exactly as torch.compile does (guards, recompiles),
    # without inductor's code generation, which takes longer than this whole file may
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    model = make_gpt(vocab_size=8)  # EOS common: rows end at different steps
    prompt, prompt_mask = left_padded(LENGTHS, 8, seed=1, pad_id=7)
    step = make_decode_step(model, "compile")
    assert isinstance(step, sampler.CompiledDecodeStep)
    with torch._dynamo.config.patch(error_on_recompile=True):  # each step, and a new cache, hit the same code
        for seed in (0, 1):
            fast = generate(model, prompt, prompt_mask, 12, eos_id=7, generator=gen(seed), decode_step=step)
            assert_same_samples(fast, generate(model, prompt, prompt_mask, 12, eos_id=7, generator=gen(seed)))
    torch._dynamo.reset()


def test_compile_mode_falls_back_to_eager_where_compiling_fails(monkeypatch, capsys):
    def failing_compile(fn, **kwargs):  # what a machine without a C++ compiler gets on the first call
        def compiled(*args):
            raise RuntimeError("no working C++ compiler found")
        return compiled
    monkeypatch.setattr(torch, "compile", failing_compile)
    model = make_gpt()
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    step = make_decode_step(model, "compile")
    fast = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(0), decode_step=step)
    assert "torch.compile failed (RuntimeError); running eager" in capsys.readouterr().out
    assert_same_samples(fast, generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=gen(0)))


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, top_k=3)])
def test_static_shape_cache_reused_across_calls_equals_eager(options):
    model = make_gpt(vocab_size=8)
    step = StaticCacheStep(model)
    for seed in (2, 3):  # the second call runs on the first call's stale cache columns
        prompt, prompt_mask = left_padded(LENGTHS, 8, seed=seed, pad_id=7)
        fast = generate(model, prompt, prompt_mask, 12, eos_id=7, generator=gen(seed), decode_step=step,
                        **options)
        slow = generate(model, prompt, prompt_mask, 12, eos_id=7, generator=gen(seed), **options)
        assert_same_samples(fast, slow)
    (cache,) = step.caches.values()  # one cache, reused
    assert cache.static_shapes and cache.k[0].size(2) == 6 + 12


# ---------------------------------------------------------------- on a GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def cuda_gen(seed):
    return torch.Generator("cuda").manual_seed(seed)


@needs_cuda
def test_cuda_graph_step_matches_eager_and_replays_across_calls():
    model = make_gpt(vocab_size=8).cuda()
    step = make_decode_step(model, "cuda_graph")
    assert isinstance(step, sampler.CUDAGraphDecodeStep)
    for seed in (0, 1):  # the second call replays the first call's graph on its reset cache
        prompt, prompt_mask = (t.cuda() for t in left_padded(LENGTHS, 8, seed=seed, pad_id=7))
        fast = generate(model, prompt, prompt_mask, 12, eos_id=7, generator=cuda_gen(seed), decode_step=step)
        slow = generate(model, prompt, prompt_mask, 12, eos_id=7, generator=cuda_gen(seed))
        assert_same_samples(fast, slow)
    assert len(step.graphs) == 1


@needs_cuda
def test_cuda_graph_step_under_bf16_autocast_gives_the_teacher_forced_logprobs():
    model = make_gpt().cuda()  # fp32 weights, bf16 autocast: as sample_responses runs it
    prompt, prompt_mask = (t.cuda() for t in left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS))
    step = make_decode_step(model, "cuda_graph")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = generate(model, prompt, prompt_mask, 10, eos_id=EOS, generator=cuda_gen(0), decode_step=step)
        forced = response_logprobs(model, prompt, prompt_mask, out["tokens"], out["mask"])
    assert torch.allclose(out["logprobs"], forced.float(), atol=0.1), (out["logprobs"] - forced).abs().max()


# ---------------------------------------------------------------- the decode loop

class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_of_generate(model, N, check_every):
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    with OpLog() as log:
        out = generate(model, prompt, prompt_mask, N, eos_id=EOS, generator=gen(0), check_every=check_every)
    assert out["tokens"].size(1) == N
    return log.ops


def test_decode_loop_grows_no_tensor_and_syncs_only_every_check_every_steps():
    model = EOSLogit(make_gpt(), float("-inf"))  # no row ever ends: every run takes all N steps
    short, long = ops_of_generate(model, 6, 4), ops_of_generate(model, 12, 4)
    extra = long - short  # what six more steps cost
    assert "cat" not in extra and "stack" not in extra, extra  # no torch.cat growth of the cache or outputs
    # reading a device value on the host (.item(), bool(), int()) is a sync: the all-finished checks
    # after steps 4 and 8, and the output width at the end
    syncs = lambda ops: sum(ops[name] for name in ("item", "is_nonzero", "_local_scalar_dense"))
    assert syncs(long) == 3
    assert syncs(short) == 2  # the check after step 4, and the width


def test_stops_at_the_first_check_after_every_row_ended_and_runs_in_inference_mode():
    model = EOSLogit(make_gpt(), 100.0)  # every row draws EOS at once
    prompt, prompt_mask = left_padded(LENGTHS, TINY["vocab_size"], pad_id=EOS)
    out = generate(model, prompt, prompt_mask, 20, eos_id=EOS, generator=gen(0), check_every=4)
    assert model.calls == 1 + 3  # the prefill, then steps 1-3; the check after step 4 stops the loop
    assert out["tokens"].tolist() == [[EOS]] * 4 and out["mask"].tolist() == [[1]] * 4
    assert model.inference_mode_seen == {True}
    assert not out["logprobs"].is_inference()  # ordinary tensors: PPO can train on them


# ---------------------------------------------------------------- the draw

def test_inverse_cdf_draw_never_lands_on_a_zero_probability_token(monkeypatch):
    probs = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.75, 0.0]).expand(4, 6)  # zeros first, inside and last
    # torch.rand's extremes 0 and 1 - 2^-24, and both sides of the 0.25 boundary
    u = torch.tensor([[0.0], [1 - 2 ** -24], [0.75], [0.7500001]])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: u)
    assert sampler._inverse_cdf_draw(probs).tolist() == [4, 1, 1, 1]


# ---------------------------------------------------------------- bench.py

def test_bench_sample_runs_and_prints_the_table():
    out = subprocess.run([sys.executable, "bench.py", "sample", "--models", "tiny", "--naive", "tiny", "--no_hf",
                          "--batch", "4", "--new_tokens", "4", "--repeats", "1", "--cuda_graph"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "running eager" in out.stdout  # the CUDA-graph column falls back on CPU
    header, rule, row = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert "eager/naive" in header and "cuda_graph/naive" in header and row.startswith("| tiny |")


@pytest.mark.parametrize("what", ["train", "ppo"])
def test_bench_train_and_ppo_run(what):
    out = subprocess.run([sys.executable, "bench.py", what, "--preset", "tiny", "--steps", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    if what == "train":  # on CPU fp32 and bf16 autocast are timed side by side
        assert "torch.float32, dropout 0.1 on cpu" in out.stdout and "torch.bfloat16, dropout 0.1 on cpu" in out.stdout
    else:
        assert all(part in out.stdout for part in ("rollout", "score", "ref_value", "learn", "peak memory"))
