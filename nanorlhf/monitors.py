"""Monitors of reward hacking that read no gold score, their threshold logic, and the guards the RL stages
(train_ppo.py, train_pg.py) take from them: a conservative ensemble reward refused early without an ensemble,
and the stop on a monitor's warning. docs/ensembles.md gives each threshold's reason and what they measured.
"""
import math
import os

import numpy as np
import torch

from nanorlhf.checkpoint import ckpt_path
from nanorlhf.distributed import all_reduce_mean
from nanorlhf.ensemble import aggregate, disagreement, distinct2, load_ensemble, member_scores

# The monitors: name -> (threshold, "above" | "below", what it reads). A warning comes when a monitor stays past
# its threshold for --monitor_patience consecutive iterations. The reasons are in docs/ensembles.md.
MONITORS = {
    "disagreement_ratio": (1.5, "above", "std of the members' scores on the policy's samples / on SFT samples"),
    "frac_above_sft_q99": (0.5, "above", "share of the policy's samples the RM scores above SFT samples' 99th "
                                         "percentile"),
    "length_ratio": (1.2, "above", "mean response length (tokens) / SFT samples'"),
    "distinct2_ratio": (0.9, "below", "mean per-response distinct-2 / SFT samples'"),
}


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
    """The monitors of an RL run (PPO, the critic-free methods), read every iteration from its samples alone (no
    gold score): observe() gives their values as metrics and the names of those that warn now (once each, when a
    monitor has stayed past its threshold for `patience` iterations). The baseline is the RM's calibration;
    without one (an RM trained before calibrations were stored) the first observed iteration's samples are the
    baseline."""

    def __init__(self, calibration, reward_ensemble, lam, patience, thresholds=None):
        self.cal, self.how, self.lam, self.patience = dict(calibration or {}), reward_ensemble, lam, patience
        self.thresholds = {name: (thresholds or {}).get(name, t) for name, (t, _, _) in MONITORS.items()}
        if "scores" in self.cal:  # the range of the reward the RL stage optimises, on SFT samples
            cal_scores = self.cal["scores"]
            self.reward_range = self.reward(cal_scores)
            if cal_scores.shape[0] > 1:
                self.cal["disagreement"] = float(disagreement(cal_scores))
        self.series = {name: [] for name in MONITORS}
        self.warned = {}  # name -> the iteration it warned at

    def observe(self, iteration, scores, reward, lengths, texts, reduce=float):
        """scores: the members' normalised scores (K, B) (K = 1: a lone RM); reward (B,): what the stage optimises
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
            # not "== the last index": a run resumed with a smaller patience or a tighter threshold finds a streak
            # that ended earlier in the saved series, and must warn now, not never
            if name not in self.warned and first_warning(self.series[name], self.thresholds[name], direction,
                                                         self.patience) is not None:
                self.warned[name] = iteration
                warnings.append(name)
        return values, warnings

    def state_dict(self):
        """The series and warnings so far, saved in the run's checkpoint (a resumed run warns as one run would)."""
        return {"series": {k: list(v) for k, v in self.series.items()}, "warned": dict(self.warned),
                "cal_length": self.cal.get("length"), "cal_distinct2": self.cal.get("distinct2")}

    def load_state_dict(self, state, upto=None):
        """upto: the checkpoint's iteration. A run stopped by --stop_on_monitor saves the policy of an earlier
        iteration than its monitors have seen: what came after it is dropped, as resume drops its metrics."""
        self.series = {name: list(state["series"].get(name, []))[:upto] for name in MONITORS}
        self.warned = {name: it for name, it in state["warned"].items() if upto is None or it <= upto}
        if state.get("cal_length") is not None:  # a baseline taken from the first iteration's samples
            self.cal.setdefault("length", state["cal_length"])
            self.cal.setdefault("distinct2", state["cal_distinct2"])

    def reward(self, scores):
        """The RM reward the RL stage optimises, from the members' scores (K, B): member 0's or their aggregate."""
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


def ensemble_reward(members, batch, scores, ended, cfg, rt, raw0):
    """The RL stages' reward: scores (B,) from score_responses (member 0's, the no-EOS penalty where a response
    never ended), unchanged unless cfg.reward_ensemble names a conservative reward; then that aggregate of the
    members' scores where the response ended. raw0: member 0's scores before the penalty (score_responses with
    raw=True), so that member 0 is not run twice. -> the reward (B,) and the members' scores (K, B) (a lone RM:
    scores[None])."""
    if len(members) == 1:
        return scores, scores[None]
    all_scores = torch.cat([raw0.float()[None], member_scores(members[1:], batch, rt)])
    if cfg.reward_ensemble:
        scores = torch.where(ended, aggregate(all_scores, cfg.reward_ensemble, cfg.ensemble_lambda), scores)
    return scores, all_scores


def require_ensemble(cfg):
    """--reward_ensemble needs an ensemble in --rm_dir: refused before any missing stage is trained for the run."""
    if not cfg.reward_ensemble:
        return
    fix = f"train one with `python train_rm.py --ensemble 3 --out_dir {cfg.rm_dir}`, or drop --reward_ensemble"
    if not os.path.exists(ckpt_path(cfg.rm_dir)):
        raise SystemExit(f"--reward_ensemble {cfg.reward_ensemble} needs an ensemble in --rm_dir {cfg.rm_dir}, which "
                         f"holds no reward model: {fix}")
    try:
        saved = torch.load(ckpt_path(cfg.rm_dir), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: loading the RM says what is wrong with it and what to do
        return
    if int(saved.get("config", {}).get("ensemble", 1)) < 2:
        raise SystemExit(f"--reward_ensemble {cfg.reward_ensemble} needs an ensemble in --rm_dir {cfg.rm_dir}, which "
                         f"holds a lone reward model: {fix}")


def rl_monitors(cfg, rm, rm_ckpt, sft_ckpt, device, resume=None):
    """The RL stages' (train_ppo.py, train_pg.py) ensemble members (a list of (model, gain, bias); [rm] for a
    lone RM) and Monitors, with their series so far from a --resume checkpoint (a resumed run warns when one
    unbroken run would). Raises CheckpointError for a broken ensemble. The flags were checked with the config
    (checks.py), and --reward_ensemble without an ensemble by require_ensemble, before any stage was trained."""
    members, cal = load_ensemble(cfg.rm_dir, device, sft_ckpt, member0=(rm, rm_ckpt))  # require_ensemble ran
    if cfg.ensemble_lambda != 1.0 and cfg.reward_ensemble != "mean_std" and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: --ensemble_lambda {cfg.ensemble_lambda} is read only by --reward_ensemble mean_std; "
              f"this run ignores it")
    monitors = Monitors(cal, cfg.reward_ensemble, cfg.ensemble_lambda, cfg.monitor_patience,
                        parse_thresholds(cfg.monitor_thresholds))
    if resume is not None and "monitors" in resume:
        monitors.load_state_dict(resume["monitors"], upto=resume["step"])
    return members, monitors


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

    def after_observe(self, updates_before, monitors, warned):
        """updates_before: the updates done before this iteration's (its 0-based index). -> True when the run
        must stop now; the weights go back only in restore(), after this iteration's end_step (a Ctrl-C there
        saves the latest weights under the latest step, as in any run)."""
        if not self.on:
            return False
        if monitors.clear():
            self.good = (updates_before, self.before)
        return bool(warned)

    def restore(self):
        """Put the last clear weights back -> their number of updates (the step to save them under)."""
        self.stopped = self.good[0]
        for net, state in zip(self.nets, self.good[1]):
            net.load_state_dict(state)
        return self.stopped

    def line(self, iteration, warned, out_dir):
        return (f"stopped by --stop_on_monitor at iteration {iteration}: {', '.join(warned)} warned; kept the policy "
                f"after {self.stopped} updates, the last one whose samples no monitor was past its threshold on "
                f"(saved {out_dir}/ckpt.pt; its optimizer, RNG and baseline or beta states are the latest ones)")
