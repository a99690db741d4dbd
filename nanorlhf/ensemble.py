"""Reward-model ensembles: K reward models that differ in seed and data order, the conservative rewards made
from them (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"), and the calibration on
SFT samples that the monitors of reward hacking (monitors.py) read. docs/ensembles.md says why each is there.

Layout of an ensemble's folder (train_rm.py --ensemble K):
    rm_dir/ckpt.pt              member 0, an ordinary reward model: every reader of rm_dir keeps working
    rm_dir/member_1/ckpt.pt ..  members 1 .. K-1, each trained by train_rm.py in a child process
    rm_dir/ensemble.pt          the members' names and the calibration: statistics of the scores, lengths and
                                distinct-2 of the SFT samples the RM was normalised on (plain values)
"""
import os
import subprocess
import sys
import time

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_model
from nanorlhf.guard import run_child
from nanorlhf.io import atomic_write
from nanorlhf.reward import normalised_score, normalised_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train_rm.py is
AGGREGATES = ("mean", "mean_std", "min")
MEMBER_SEED = 1000  # member m trains with seed + 1000 m: its epoch orders (seed + epoch) never meet member 0's


# ---------------------------------------------------------------- training and loading
def member_dir(rm_dir, m):
    return rm_dir if m == 0 else os.path.join(rm_dir, f"member_{m}")


def random_head(model, seed):
    """An ensemble member's scalar head starts from small random weights drawn from its own seed (a lone RM's
    starts at zero): with one pretrained trunk, the seed has nothing else to vary at initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.02)


def bootstrap_groups(groups, seed):
    """A bootstrap sample of the preference groups (a prompt's comparisons stay together): len(groups) drawn
    with replacement."""
    rng = np.random.default_rng(seed + 7)
    return [groups[i] for i in rng.integers(0, len(groups), len(groups))]


def member_split(cfg):
    """The validation prompts of member 0, which members 1.. share (None for member 0 itself)."""
    if not cfg.member:
        return None
    parent = os.path.dirname(os.path.abspath(cfg.out_dir))
    try:
        return set(torch.load(ckpt_path(parent), map_location="cpu", weights_only=True)["val_groups"])
    except (OSError, KeyError, RuntimeError) as e:
        raise SystemExit(f"--member {cfg.member}: cannot read member 0's split from {ckpt_path(parent)} ({e}); "
                         f"train the ensemble with `python train_rm.py --ensemble K`, not --member") from None


def train_members(cfg, config_dict):
    """Members 1 .. K-1: train_rm.py in a child process each, on member 0's prefs.jsonl and validation split,
    with seed + 1000 m; each writes rm_dir/member_m/ (its console output in stdout.log there)."""
    skip = {"out_dir", "prefs", "seed", "ensemble", "member", "resume", "extra_prefs", "policy_dir"}
    flags = {k: v for k, v in config_dict.items() if k not in skip}
    for m in range(1, cfg.ensemble):
        out = member_dir(cfg.out_dir, m)
        os.makedirs(out, exist_ok=True)
        # the RM's prompts and responses: with --policy_dir the policy's (normalisation samples too)
        command = [sys.executable, os.path.join(ROOT, "train_rm.py"), "--out_dir", out,
                   "--prefs", os.path.join(cfg.out_dir, "prefs.jsonl"), "--seed", str(cfg.seed + MEMBER_SEED * m),
                   "--member", str(m), "--ensemble", "1", "--policy_dir", cfg.policy_dir,
                   *[a for k, v in flags.items() for a in (f"--{k}", str(v))]]
        print(f"ensemble member {m} of {cfg.ensemble}: train_rm.py -> {out} (output in {out}/stdout.log)", flush=True)
        with open(os.path.join(out, "stdout.log"), "w") as log:
            code = run_child(command, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            with open(os.path.join(out, "stdout.log")) as log:
                tail = log.read()[-2000:]
            raise SystemExit(f"ensemble member {m} failed (exit {code}); the end of {out}/stdout.log:\n{tail}")


def load_ensemble(rm_dir, device, tokenizer_of=None, member0=None):
    """The members of the reward model in rm_dir: a list of (model, gain, bias), member 0 first (a lone RM is a
    list of one), in eval mode and frozen; and the calibration the monitors read (the ensemble's, or a lone
    RM's own; None for an RM trained before calibrations were stored). Every member is loaded as any
    checkpoint is (weights_only=True, checked) and must share member 0's pairs. member0: (model, ckpt) of
    rm_dir when already loaded."""
    if member0 is None:
        member0 = load_model(rm_dir, "rm", device, tokenizer_of=tokenizer_of)[::2]
    rm, ckpt = member0
    members = [(rm, ckpt["gain"], ckpt["bias"])]
    k = int(ckpt["config"].get("ensemble", 1))
    if k == 1:
        return members, ckpt.get("calibration")
    fix = f"rerun `python train_rm.py --ensemble {k} --out_dir {rm_dir}` (with the flags it was made with)"
    path = os.path.join(rm_dir, "ensemble.pt")
    if not os.path.exists(path):
        raise CheckpointError(f"{rm_dir} was trained as an ensemble of {k} but has no ensemble.pt (stopped before "
                              f"its members finished): {fix}")
    if os.path.getmtime(path) < os.path.getmtime(ckpt_path(rm_dir)):
        raise CheckpointError(f"{path} is older than {ckpt_path(rm_dir)}: member 0 was retrained after the "
                              f"ensemble was made; {fix}")
    info = torch.load(path, map_location="cpu", weights_only=True)
    for m in range(1, k):
        if os.path.exists(ckpt_path(member_dir(rm_dir, m))) and \
                os.path.getmtime(ckpt_path(member_dir(rm_dir, m))) > os.path.getmtime(path):
            raise CheckpointError(f"ensemble member {m} in {rm_dir} was retrained after {path} was made; {fix}")
        model, _, member_ckpt = load_model(member_dir(rm_dir, m), "rm", device, tokenizer_of=tokenizer_of or ckpt,
                                           flag="--rm_dir")
        if member_ckpt.get("prefs_digest") != ckpt.get("prefs_digest"):
            raise CheckpointError(f"ensemble member {m} in {rm_dir} was trained on other preference pairs than "
                                  f"member 0: {fix}")
        members.append((model, member_ckpt["gain"], member_ckpt["bias"]))
    for model, _, _ in members:
        model.eval().requires_grad_(False)
    return members, info["calibration"]


# ---------------------------------------------------------------- scores and conservative rewards
@torch.no_grad()
def member_scores(members, batch, rt):
    """Each member's normalised score of a PPO batch's responses -> (K, B), fp32."""
    with rt.autocast():
        return torch.stack([normalised_score(rm, gain, bias, batch["prompt"], batch["prompt_mask"],
                                             batch["response"], batch["mask"]).float()
                            for rm, gain, bias in members])


@torch.no_grad()
def sampled_member_scores(members, batches, rt):
    """Each member's normalised score of sample_responses' batches -> (K, M) on the CPU."""
    return torch.stack([normalised_scores(rm, gain, bias, batches, rt) for rm, gain, bias in members])


def aggregate(scores, how, lam=1.0):
    """Conservative rewards from the members' scores (K, B) -> (B,) (Coste et al. 2023): "mean"; "mean_std", the
    uncertainty-weighted mean - lam * std over the members (ddof 0; their UWO subtracts the variance, the std
    keeps lam in reward units); "min", the worst case (their WCO)."""
    if how == "mean":
        return scores.mean(0)
    if how == "mean_std":
        return scores.mean(0) - lam * scores.std(0, unbiased=False)
    if how == "min":
        return scores.min(0).values
    raise ValueError(f"unknown ensemble reward {how!r}: choose one of {', '.join(AGGREGATES)}")


def disagreement(scores):
    """The members' disagreement: the std over members of each response's score, averaged over responses (0-dim)."""
    return scores.std(0, unbiased=False).mean()


# ---------------------------------------------------------------- calibration on SFT samples
def distinct2(text):
    """Distinct bigrams / bigrams of one response's words (1 for fewer than 2 words): a loop lowers it."""
    words = text.split()
    grams = list(zip(words, words[1:]))
    return len(set(grams)) / len(grams) if grams else 1.0


def calibration(scores, lengths, texts):
    """What the monitors compare the policy's samples with, measured on the SFT samples the RM was normalised
    on: the members' scores (K, M) (a lone RM: K = 1), kept whole so that any aggregate's range can be read
    from them; the mean length in tokens and the mean per-response distinct-2. Tensors and plain values."""
    return {"scores": scores.float().cpu().clone(), "length": float(np.mean(lengths)),
            "distinct2": float(np.mean([distinct2(t) for t in texts]))}


def sample_lengths(sampled):
    """Response lengths in tokens (through <|endoftext|>) of sample_responses' output (M,)."""
    return torch.cat([b["mask"].sum(1).cpu() for b in sampled["batches"]]).float().numpy()


def save_ensemble(cfg, members, norm_sampled, rt):
    """rm_dir/ensemble.pt: the members and the calibration on the normalisation samples (member 0's)."""
    cal = calibration(sampled_member_scores(members, norm_sampled["batches"], rt), sample_lengths(norm_sampled),
                      norm_sampled["texts"])
    info = {"k": len(members), "members": [member_dir("", m) or "." for m in range(len(members))], "calibration": cal}
    atomic_write(os.path.join(cfg.out_dir, "ensemble.pt"), lambda f: torch.save(info, f))
    return cal


def finish_ensemble(cfg, config_dict, member0, norm_sampled, rt, tokenizer_of):
    """train_rm.py --ensemble K, after member 0 is saved: train members 1 .. K-1, load them all, and write
    ensemble.pt with their scores on member 0's normalisation samples. member0: (model, gain, bias)."""
    t0 = time.time()
    train_members(cfg, config_dict)
    members = [member0] + [load_model(member_dir(cfg.out_dir, m), "rm", rt.device, tokenizer_of=tokenizer_of)
                           for m in range(1, cfg.ensemble)]
    members = [members[0]] + [(model.eval(), ckpt["gain"], ckpt["bias"]) for model, _, ckpt in members[1:]]
    cal = save_ensemble(cfg, members, norm_sampled, rt)
    scores = cal["scores"]
    corr = np.corrcoef(scores.numpy())[0, 1:] if len(members) > 1 else []
    print(f"ensemble of {len(members)} reward models ({time.time() - t0:.0f} s for members 1..{len(members) - 1}): "
          f"on the {scores.shape[1]} normalisation samples, disagreement (std over members) "
          f"{float(disagreement(scores)):.3f}, correlation of member 0 with the others "
          f"{', '.join(f'{c:.3f}' for c in corr)}; saved {cfg.out_dir}/ensemble.pt")
