"""Reward-model ensembles: K reward models that differ in seed and data order, the conservative rewards made
from them (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"), and monitors of
reward hacking that read no gold score, with their threshold logic. docs/ensembles.md says why each is there.

Layout of an ensemble's folder (train_rm.py --ensemble K):
    rm_dir/ckpt.pt              member 0, an ordinary reward model: every reader of rm_dir keeps working
    rm_dir/member_1/ckpt.pt ..  members 1 .. K-1, each trained by train_rm.py in a child process
    rm_dir/ensemble.pt          the members' names and the calibration: statistics of the scores, lengths and
                                distinct-2 of the SFT samples the RM was normalised on (plain values)
"""
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, ckpt_path, load_model
from nanorlhf.distributed import all_reduce_mean
from nanorlhf.guard import run_child
from nanorlhf.io import atomic_write
from nanorlhf.reward import normalised_score, normalised_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where train_rm.py is
AGGREGATES = ("mean", "mean_std", "min")
MEMBER_SEED = 1000  # member m trains with seed + 1000 m: its epoch orders (seed + epoch) never meet member 0's

# The monitors: name -> (threshold, "above" | "below", what it reads). A warning comes when a monitor stays past
# its threshold for --monitor_patience consecutive iterations. The reasons are in docs/ensembles.md.
MONITORS = {
    "disagreement_ratio": (1.5, "above", "std of the members' scores on the policy's samples / on SFT samples"),
    "frac_above_sft_q99": (0.5, "above", "share of the policy's samples the RM scores above SFT samples' 99th "
                                         "percentile"),
    "length_ratio": (1.2, "above", "mean response length (tokens) / SFT samples'"),
    "distinct2_ratio": (0.9, "below", "mean per-response distinct-2 / SFT samples'"),
}


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


def ensemble_reward(members, batch, scores, ended, cfg, rt, raw0=None):
    """The RL stages' reward: scores (B,) from score_responses (member 0's, the no-EOS penalty where a response
    never ended), unchanged unless cfg.reward_ensemble names a conservative reward; then that aggregate of the
    members' scores where the response ended. raw0: member 0's scores before the penalty (score_responses with
    raw=True), so that member 0 is not run twice. -> the reward (B,) and the members' scores (K, B) (a lone RM:
    scores[None])."""
    if len(members) == 1:
        return scores, scores[None]
    first = member_scores(members[:1], batch, rt) if raw0 is None else raw0.float()[None]
    all_scores = torch.cat([first, member_scores(members[1:], batch, rt)])
    if cfg.reward_ensemble:
        scores = torch.where(ended, aggregate(all_scores, cfg.reward_ensemble, cfg.ensemble_lambda), scores)
    return scores, all_scores


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


# ---------------------------------------------------------------- monitors that read no gold
def first_warning(values, threshold, direction, patience):
    """Index of the value at which a series has been past its threshold for `patience` consecutive values
    (None if never): the iteration a monitor warns. Missing values (None, nan) break a streak."""
    streak = 0
    for i, v in enumerate(values):
        past = v is not None and math.isfinite(v) and (v > threshold if direction == "above" else v < threshold)
        streak = streak + 1 if past else 0
        if streak >= patience:
            return i
    return None


class Monitors:
    """The monitors of a PPO run, read every iteration from its samples alone (no gold score): observe() gives
    their values as metrics and the names of those that warn now (once each, when a monitor has stayed past its
    threshold for `patience` iterations). The baseline is the RM's calibration; without one (an RM trained
    before calibrations were stored) the first observed iteration's samples are the baseline."""

    def __init__(self, calibration, reward_ensemble, lam, patience, thresholds=None):
        self.cal, self.how, self.lam, self.patience = dict(calibration or {}), reward_ensemble, lam, patience
        self.thresholds = {name: (thresholds or {}).get(name, t) for name, (t, _, _) in MONITORS.items()}
        if "scores" in self.cal:  # the range of the reward PPO optimises, on SFT samples
            cal_scores = self.cal["scores"]
            self.reward_range = self.reward(cal_scores)
            if cal_scores.shape[0] > 1:
                self.cal["disagreement"] = float(disagreement(cal_scores))
        self.series = {name: [] for name in MONITORS}
        self.warned = {}  # name -> the iteration it warned at

    def observe(self, iteration, scores, reward, lengths, texts, reduce=float):
        """scores: the members' normalised scores (K, B) (K = 1: a lone RM); reward (B,): what PPO optimises
        (with the no-EOS penalty); lengths (B,) in tokens; reduce: a value's mean over the processes (DDP)."""
        length, d2 = reduce(float(np.mean(lengths))), reduce(float(np.mean([distinct2(t) for t in texts])))
        if "length" not in self.cal:  # no calibration stored: these samples are the baseline
            self.cal.update(length=length, distinct2=d2)
        values = {"length_ratio": length / max(self.cal["length"], 1e-9),
                  "distinct2_ratio": d2 / max(self.cal["distinct2"], 1e-9)}
        if scores.shape[0] > 1 and "disagreement" in self.cal:
            values["disagreement"] = reduce(float(disagreement(scores)))
            values["disagreement_ratio"] = values["disagreement"] / max(self.cal["disagreement"], 1e-9)
        if "scores" in self.cal:
            r = reward.float().cpu()
            values["frac_above_sft_q99"] = reduce(float((r > torch.quantile(self.reward_range, 0.99)).float().mean()))
            values["frac_above_sft_max"] = reduce(float((r > self.reward_range.max()).float().mean()))
        warnings = []
        for name, (_, direction, _) in MONITORS.items():
            self.series[name].append(values.get(name))
            if name not in self.warned and first_warning(self.series[name], self.thresholds[name], direction,
                                                         self.patience) == len(self.series[name]) - 1:
                self.warned[name] = iteration
                warnings.append(name)
        return values, warnings

    def state_dict(self):
        """The series and warnings so far (saved in the run's checkpoint: a resumed run warns as one run would)."""
        return {"series": {k: list(v) for k, v in self.series.items()}, "warned": dict(self.warned),
                "cal_length": self.cal.get("length"), "cal_distinct2": self.cal.get("distinct2")}

    def load_state_dict(self, state):
        self.series = {name: list(state["series"].get(name, [])) for name in MONITORS}
        self.warned = dict(state["warned"])
        if state.get("cal_length") is not None:  # a baseline taken from the first iteration's samples
            self.cal.setdefault("length", state["cal_length"])
            self.cal.setdefault("distinct2", state["cal_distinct2"])

    def reward(self, scores):
        """The RM reward PPO optimises, from the members' scores (K, B): member 0's, or the ensemble's aggregate."""
        return aggregate(scores, self.how, self.lam) if self.how else scores[0]

    def clear(self):
        """No monitor is past its threshold now (the policy of this iteration is a good one to keep)."""
        return all(not self.series[name] or first_warning(self.series[name][-1:], self.thresholds[name], d, 1) is None
                   for name, (_, d, _) in MONITORS.items())

    def warning_line(self, name, iteration, value):
        _, direction, what = MONITORS[name]
        return (f"MONITOR WARNING at iteration {iteration}: {name} {value:.3f} has been {direction} "
                f"{self.thresholds[name]:g} for {self.patience} iterations ({what}); the policy may be exploiting "
                f"the reward model")


def parse_thresholds(text):
    """--monitor_thresholds "name=value,..." -> {name: value}; a ValueError that names the monitors for anything
    else (check_config calls this before the run starts)."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, value = item.partition("=")
        try:
            if name.strip() not in MONITORS or not math.isfinite(float(value)):
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--monitor_thresholds: {item!r} is not name=number (a finite number) with a name among "
                             f"{', '.join(MONITORS)}") from None
    return out


def require_ensemble(cfg):
    """--reward_ensemble needs an ensemble in --rm_dir: refused before any missing stage is trained for the run."""
    if not cfg.reward_ensemble:
        return
    fix = f"train one with `python train_rm.py --ensemble 3 --out_dir {cfg.rm_dir}`, or drop --reward_ensemble"
    if not os.path.exists(ckpt_path(cfg.rm_dir)):
        raise SystemExit(f"--reward_ensemble {cfg.reward_ensemble} needs an ensemble in --rm_dir {cfg.rm_dir}, which "
                         f"holds no reward model: {fix}")
    saved = torch.load(ckpt_path(cfg.rm_dir), map_location="cpu", weights_only=True, mmap=True)
    if int(saved.get("config", {}).get("ensemble", 1)) < 2:
        raise SystemExit(f"--reward_ensemble {cfg.reward_ensemble} needs an ensemble in --rm_dir {cfg.rm_dir}, which "
                         f"holds a lone reward model: {fix}")


def ppo_monitors(cfg, rm, rm_ckpt, sft_ckpt, device):
    """The RL stages' (train_ppo.py, train_pg.py) ensemble members (a list of (model, gain, bias); [rm] for a
    lone RM) and Monitors. Raises CheckpointError for a broken ensemble, SystemExit for --reward_ensemble
    without one. The flags themselves were checked with the config (checks.py)."""
    members, cal = load_ensemble(cfg.rm_dir, device, sft_ckpt, member0=(rm, rm_ckpt))
    if cfg.reward_ensemble and len(members) == 1:
        raise SystemExit(f"--reward_ensemble {cfg.reward_ensemble} needs an ensemble in --rm_dir {cfg.rm_dir}: train "
                         f"one with `python train_rm.py --ensemble 3`, or drop --reward_ensemble")
    if cfg.ensemble_lambda != 1.0 and cfg.reward_ensemble != "mean_std":
        print(f"note: --ensemble_lambda {cfg.ensemble_lambda} is read only by --reward_ensemble mean_std; "
              f"this run ignores it")
    return members, Monitors(cal, cfg.reward_ensemble, cfg.ensemble_lambda, cfg.monitor_patience,
                             parse_thresholds(cfg.monitor_thresholds))


def watch(monitors, iteration, all_scores, reward, batch, texts, rt):
    """One iteration of the monitors in an RL stage: their values (averaged over the processes), a printed
    warning for each that warns now. -> (values, the names that warned)."""
    values, warned = monitors.observe(iteration, all_scores, reward, batch["mask"].sum(1).float().cpu().numpy(),
                                      texts, lambda v: float(all_reduce_mean(torch.tensor(v, device=rt.device), rt)))
    for name in warned if rt.is_main else ():
        print(monitors.warning_line(name, iteration, values[name]), flush=True)
    return values, warned


def snapshot(*nets):
    """Copies of the nets' weights (--stop_on_monitor keeps the last policy no monitor was past)."""
    return [{k: v.detach().clone() for k, v in net.state_dict().items()} for net in nets]


class StopOnMonitor:
    """--stop_on_monitor: remember the weights that sampled the last batch no monitor was past its threshold on,
    and at a warning put them back so the run saves and evaluates them. Off: every method does nothing."""

    def __init__(self, on, start, *nets):
        self.on, self.nets, self.stopped = on, nets, None
        self.good = (start, snapshot(*nets)) if on else None  # (updates done, their weights)

    def before_update(self):
        """Call after the rollout, before the update: these weights sampled this iteration's batch."""
        if self.on:
            self.before = snapshot(*self.nets)

    def after_observe(self, iteration, monitors, warned):
        """-> True when the run must stop now (the nets then hold the last clear weights: self.stopped updates)."""
        if not self.on:
            return False
        if monitors.clear():
            self.good = (iteration, self.before)
        if not warned:
            return False
        self.stopped = self.good[0]
        for net, state in zip(self.nets, self.good[1]):
            net.load_state_dict(state)
        return True

    def line(self, iteration, warned, out_dir):
        return (f"stopped by --stop_on_monitor at iteration {iteration}: {', '.join(warned)} warned; kept the policy "
                f"after {self.stopped} updates, the last one whose samples no monitor was past its threshold on "
                f"(saved {out_dir}/ckpt.pt; its optimizer states are the latest ones)")


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
