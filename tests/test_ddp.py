"""Several processes (DistributedDataParallel, CPU gloo backend, launched by torchrun as a user
launches them) and gradient checkpointing.

Two processes that each take half of a global batch must train exactly as one process that
takes all of it: the loss is a mean over the tokens (or pairs) of the whole batch, not a mean
of the ranks' means (nanorlhf.distributed.global_mean_denominator), and DDP averages the gradients."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import make_gpt, make_scalar_gpt
from nanorlhf.checkpoint import load_checkpoint
from nanorlhf.distributed import epoch_batch
from nanorlhf.runtime import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script, *args, nproc=1, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                                      "--master_port", str(free_port())]
    result = subprocess.run([sys.executable, *launcher, script, "--preset", "tiny", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --loss_on response: rows have different numbers of loss tokens, so each rank's mean of its own
# tokens would differ from the global mean (by ~3e-5 relative in the loss, ~4e-3 in the gradient
# norm on this run). Dropout 0: the ranks draw different dropout masks than one process would.
# grad_accum 2: DDP must average the gradients once, after both micro-batches.
SFT_ARGS = ("--loss_on", "response", "--sft_dropout", "0", "--max_iters", "3", "--eval_every", "3",
            "--sample_every", "3", "--grad_accum", "2")


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    one, two = str(tmp_path_factory.mktemp("sft1")), str(tmp_path_factory.mktemp("sft2"))
    run("train_sft.py", "--out_dir", one, *SFT_ARGS)
    result = run("train_sft.py", "--out_dir", two, *SFT_ARGS, nproc=2)
    return one, two, result


def test_two_processes_train_as_one_on_the_same_global_batch(sft_runs):
    one, two, _ = sft_runs
    single, ddp = metrics(one), metrics(two)
    assert [r["step"] for r in single] == [r["step"] for r in ddp] == [1, 2, 3]
    # float32 sums in another order: ~1e-7 relative; the mean of the ranks' means misses by >= 3e-5
    for a, b in zip(single, ddp):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    w1, w2 = load_checkpoint(one, "sft")["model"], load_checkpoint(two, "sft")["model"]
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_only_rank_0_logs_and_saves(sft_runs):
    _, two, result = sft_runs
    assert "processes 2" in result.stdout
    assert result.stdout.count("model: ") == 1  # one console, not one per rank
    assert sorted(os.listdir(two)) == [".lock", "ckpt.pt", "loss.png", "metrics.jsonl"]  # .lock: rank 0's


@pytest.fixture(scope="module")
def rm_dir(sft_runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rm"))
    run("train_rm.py", "--sft_dir", sft_runs[1], "--out_dir", out, "--n_prompts", "16", nproc=2)
    return out


@pytest.mark.parametrize("script, args", [
    ("train_rm.py", ()),  # the rm_dir fixture ran it
    ("train_ppo.py", ("--iterations", "1", "--eval_prompts", "4")),
    ("train_dpo.py", ("--max_iters", "2")),
])
def test_rm_ppo_dpo_run_on_two_processes(script, args, sft_runs, rm_dir, tmp_path):
    out = rm_dir
    if script != "train_rm.py":
        out = str(tmp_path / "out")
        run(script, "--sft_dir", sft_runs[1], "--rm_dir", rm_dir, "--out_dir", out, *args, nproc=2)
    stage = script[len("train_"):-len(".py")]
    ckpt = load_checkpoint(out, stage)
    assert ckpt["step"] >= 1
    steps = [r["step"] for r in metrics(out)]
    # one log, written by rank 0 alone: each step once (the final report may repeat the last step)
    assert steps == sorted(steps) and len(steps) - len(set(steps)) <= 1
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_epoch_batch_splits_the_single_process_batch_and_gives_every_rank_a_row():
    one = Runtime(torch.device("cpu"), torch.float32)
    ranks = [Runtime(torch.device("cpu"), torch.float32, rank=r, world_size=2) for r in range(2)]
    for step in range(6):  # 9 rows, batches of 4: steps 2 and 5 end an epoch with a single row
        whole = epoch_batch(9, 4, step, seed=3, rt=one)
        parts = [epoch_batch(9, 4, step, seed=3, rt=rt) for rt in ranks]
        assert all(len(p) >= 1 for p in parts)
        if len(whole) >= 2:
            assert sorted(whole.tolist()) == sorted(parts[0].tolist() + parts[1].tolist())
        else:  # the lone row goes to rank 0; rank 1 borrows the epoch's first row
            assert parts[0].tolist() == whole.tolist() and len(parts[1]) == 1
    epochs = [sorted(x for step in range(3 * e, 3 * e + 3) for x in epoch_batch(9, 4, step, 3, one)) for e in (0, 1)]
    assert epochs == [list(range(9))] * 2  # each epoch visits every row once


# ---------------------------------------------------------------- gradient checkpointing

@pytest.mark.parametrize("make", [make_gpt, make_scalar_gpt])
def test_gradient_checkpointing_gives_the_same_gradients(make):
    """Same loss and gradients with and without it, dropout included (the recomputed forward
    must draw the same dropout masks), and each block really runs twice per step with it."""
    grads, calls = [], []
    for grad_checkpoint in (False, True):
        model = make(dropout=0.1).train()
        gpt = model.gpt if hasattr(model, "gpt") else model
        gpt.grad_checkpoint = grad_checkpoint
        block, n_calls = gpt.transformer.h[0], [0]

        def counted_forward(*args, forward=block.forward):  # a forward hook would miss the recompute
            n_calls[0] += 1
            return forward(*args)
        block.forward = counted_forward
        idx = torch.randint(0, 23, (3, 10), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        out = model(idx)
        loss = (out.float() ** 2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(n_calls[0])
    assert calls == [1, 2]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-6, msg=name)

