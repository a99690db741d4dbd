"""train_dpo.py and sample.py: the DPO loss pieces on a tiny model, and subprocess smoke runs
of SFT -> RM -> DPO -> sample with the tiny preset (one SFT and one RM run shared by the module)."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_gpt

from nanorlhf.checkpoint import load_checkpoint, load_model
from nanorlhf.dpo import dpo_loss
from nanorlhf.model import GPT, response_logprobs
from nanorlhf.optim import make_optimizer, optimizer_step
from nanorlhf.runtime import Runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread beats two contended ones


def run(*args, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT, RM (with its prefs.jsonl) and a 4-step DPO run, once for the module."""
    out = tmp_path_factory.mktemp("dpo_stage")
    d = {k: str(out / k) for k in ("sft", "rm", "dpo")}
    run("train_sft.py", "--preset", "tiny", "--device", "cpu", "--out_dir", d["sft"])
    run("train_rm.py", "--preset", "tiny", "--device", "cpu", "--sft_dir", d["sft"], "--out_dir", d["rm"],
        "--n_prompts", "24", "--norm_samples", "8", "--eval_samples", "8")
    d["dpo_stdout"] = run("train_dpo.py", "--preset", "tiny", "--device", "cpu", "--sft_dir", d["sft"],
                          "--rm_dir", d["rm"], "--out_dir", d["dpo"]).stdout
    d["root"] = str(out)
    return d


# ---------------------------------------------------------------- the loss pieces, in-process

def tiny_pair_batch():
    """A hand-made batch: left-padded prompts (B, P), right-padded chosen and rejected (B, N) with masks."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50, (3, 5), generator=g)
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    chosen = torch.randint(0, 50, (3, 4), generator=g)
    chosen_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    rejected = torch.randint(0, 50, (3, 4), generator=g)
    rejected_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    return prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask


def summed_logps(model, prompt, prompt_mask, response, response_mask):
    # what train_dpo.py computes: log pi(y|x) summed over the real response tokens (B,)
    return response_logprobs(model, prompt, prompt_mask, response, response_mask).sum(1)


def loop_logps(model, prompt, prompt_mask, response, response_mask):
    """The obviously-correct version: each row alone, unpadded, one token at a time."""
    out = []
    for b in range(prompt.size(0)):
        x = prompt[b][prompt_mask[b].bool()].tolist()
        total = 0.0
        for t in response[b][response_mask[b].bool()].tolist():
            logits = model(torch.tensor([x]))[0, -1]
            total += torch.log_softmax(logits.double(), -1)[t].item()
            x.append(t)
        out.append(total)
    return torch.tensor(out)


def test_dpo_pieces_start_at_log2_then_learn():
    policy = make_gpt(vocab_size=50).train()
    reference = make_gpt(vocab_size=50).requires_grad_(False)  # the same weights, frozen
    prompt, prompt_mask, chosen, chosen_mask, rejected, rejected_mask = tiny_pair_batch()

    def losses():
        with torch.no_grad():
            ref = [summed_logps(reference, prompt, prompt_mask, r, m) for r, m in
                   ((chosen, chosen_mask), (rejected, rejected_mask))]
        pol = [summed_logps(policy, prompt, prompt_mask, r, m) for r, m in
               ((chosen, chosen_mask), (rejected, rejected_mask))]
        return dpo_loss(pol[0], pol[1], ref[0], ref[1], beta=0.1), ref

    # the summed logprobs under padding equal the per-row loop
    torch.testing.assert_close(summed_logps(policy, prompt, prompt_mask, chosen, chosen_mask),
                               loop_logps(policy, prompt, prompt_mask, chosen, chosen_mask).float(),
                               atol=1e-4, rtol=1e-5)
    # step 0: policy == reference, so every log-ratio is 0 and the loss is -log sigmoid(0) = log 2
    (batch_losses, chosen_rewards, rejected_rewards), ref_before = losses()
    assert (chosen_rewards == 0).all() and (rejected_rewards == 0).all()
    assert batch_losses.mean().item() == pytest.approx(math.log(2), abs=1e-7)
    # one AdamW step on the DPO loss: the loss falls, the margin turns positive, the reference is unchanged
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32)
    optimizer = make_optimizer(policy, lr=1e-2, weight_decay=0.0, device=rt.device)
    batch_losses.mean().backward()
    optimizer_step(policy, optimizer, rt, grad_clip=1.0)
    (after, chosen_rewards, rejected_rewards), ref_after = losses()
    assert after.mean().item() < math.log(2) - 1e-3
    assert (chosen_rewards - rejected_rewards).mean().item() > 0
    assert all(torch.equal(a, b) for a, b in zip(ref_before, ref_after))
    assert all(p.grad is None for p in reference.parameters())


# ---------------------------------------------------------------- smoke runs

def test_dpo_run_writes_checkpoint_metrics_plot(runs):
    ckpt = load_checkpoint(runs["dpo"], "dpo")
    assert {"stage", "model", "model_config", "config", "tokenizer", "step", "optimizer", "rng"} <= set(ckpt)
    assert ckpt["step"] == 4 and ckpt["config"]["beta"] == 0.1
    model, enc, _ = load_model(runs["dpo"], "dpo", "cpu")  # a GPT policy, like SFT's
    assert isinstance(model, GPT) and model.config.dropout == 0.0
    records = read_metrics(runs["dpo"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the first step's loss is measured before any update: policy == reference exactly
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["margin"] == 0 and records[0]["acc"] == 0.5  # every pair ties: half a hit each
    assert {"val_acc", "val_margin", "train_acc", "train_margin"} <= set(records[-1])
    assert os.path.getsize(os.path.join(runs["dpo"], "dpo.png")) > 0
    assert "PROMPT:" in runs["dpo_stdout"] and "implicit_reward" in runs["dpo_stdout"]


def test_dpo_on_bare_responses_and_pairs_that_differ_only_past_the_cut(runs, tmp_path):
    """Rows with an empty prompt (bare responses, or HH texts with no common prefix) once crashed on a
    0-wide prompt; a pair whose responses differ only past what the model holds teaches nothing: dropped."""
    long = "Tom went to the park and played with his red ball all day long with his friends. " * 8
    rows = [{"prompt": "", "chosen": f"Lily was happy {i}.", "rejected": f"Lily was sad {i}."} for i in range(12)]
    rows += [{"prompt": "Once upon a time", "chosen": long + "Then he smiled.", "rejected": long + "Then he cried."}]
    prefs = tmp_path / "bare.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run("train_dpo.py", "--preset", "tiny", "--device", "cpu", "--sft_dir", runs["sft"], "--prefs", str(prefs),
               "--out_dir", str(tmp_path / "dpo"), "--max_iters", "2")
    assert "1 of 13 pairs have a response longer than" in proc.stdout
    assert "1 pairs have the same two responses (after the cut): dropped" in proc.stdout
    assert load_checkpoint(str(tmp_path / "dpo"), "dpo")["step"] == 2


def test_dpo_resume_continues(runs):
    resumed = os.path.join(runs["root"], "dpo_resumed")
    shutil.copytree(runs["dpo"], resumed)
    proc = run("train_dpo.py", "--preset", "tiny", "--device", "cpu", "--sft_dir", runs["sft"],
               "--rm_dir", runs["rm"], "--out_dir", resumed, "--resume", "--max_iters", "6")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    ckpt = load_checkpoint(resumed, "dpo")
    assert ckpt["step"] == 6
    assert all(int(s["step"]) == 6 for s in ckpt["optimizer"]["state"].values())  # Adam moments carried on
    records = read_metrics(resumed)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[4]["margin"] != 0  # the trained policy was restored, not the SFT one


def test_dpo_without_prefs_says_run_train_rm(runs):
    proc = run("train_dpo.py", "--preset", "tiny", "--device", "cpu", "--sft_dir", runs["sft"],
               "--rm_dir", os.path.join(runs["root"], "no_rm"), "--out_dir", os.path.join(runs["root"], "x"),
               check=False)
    assert proc.returncode != 0
    assert "python train_rm.py" in proc.stderr and "--prefs" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_sample_on_dpo_checkpoint(runs):
    proc = run("sample.py", "--ckpt", runs["dpo"], "--rm_dir", runs["rm"], "--device", "cpu",
               "--n", "2", "Once upon a time, a girl")
    assert proc.stdout.count("PROMPT: Once upon a time, a girl") == 2
    assert proc.stdout.count("RESPONSE: ") == 2
    assert proc.stdout.count("reward ") == 2 and proc.stdout.count("gold ") == 2
    assert "(dpo, step 4)" in proc.stdout


def test_sample_compare_and_without_rm(runs):
    proc = run("sample.py", "--ckpt", runs["dpo"], "--compare", runs["sft"], "--rm_dir", runs["rm"],
               "--device", "cpu", "Tom was sad.")
    assert "PROMPT: Tom was sad." in proc.stdout
    assert f"[{runs['dpo']}]" in proc.stdout and f"[{runs['sft']}]" in proc.stdout
    score_line = next(line for line in proc.stdout.splitlines() if line.startswith("reward "))
    assert score_line.count("reward ") == 2 and score_line.count("gold ") == 2  # one per column
    proc = run("sample.py", "--ckpt", runs["sft"], "--rm_dir", os.path.join(runs["root"], "no_rm"),
               "--device", "cpu", "Tom was sad.")
    assert "gold " in proc.stdout and "reward " not in proc.stdout.split("(no reward column")[0]
    assert "no reward column" in proc.stdout and "python train_rm.py" in proc.stdout
