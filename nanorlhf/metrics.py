"""One console line per step, the same keys in a JSONL log, and matplotlib plots."""
import json
import os
import textwrap

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402

from nanorlhf.io import atomic_write  # noqa: E402


def _fmt(v):
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"  # 24,260 tokens/s, not 2.426e+04
    return str(v)


class MetricsLog:
    """log(step, **metrics) prints `step 40 | loss 2.31 | kl 4.9 | ...` and appends the
    same record to out_dir/metrics.jsonl. enabled=False (DDP ranks > 0) does nothing."""

    def __init__(self, out_dir, resume=False, enabled=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            if not resume and os.path.exists(self.path):
                # a new run in a used folder: the old log stays until this run's first checkpoint replaces
                # the old one (runtime.save_step puts metrics.jsonl.next in its place)
                self.path += ".next"
                if os.path.exists(self.path):
                    os.remove(self.path)

    def keep_until(self, step):
        """On resume from a checkpoint at `step`: drop the records logged after it (and a line a
        killed run left half-written), so that the log goes on without repeated steps."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        kept, foreign = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines, 1):
            record = _record(line)
            if record is None:
                if line.strip() and i < len(lines):  # not a last line without its newline: a killed run cut it
                    kept.append(line + "\n")  # not ours to delete: kept as it is, skipped when reading
                    foreign.append(i)
            elif record["step"] <= step:
                kept.append(json.dumps(record) + "\n")
        if foreign:
            print(f"warning: {self.path} lines {foreign[:5]}{' ...' if len(foreign) > 5 else ''} are not metrics "
                  f"records (JSON objects with a numeric step); kept as they are, skipped in plots")
        atomic_write(self.path, lambda f: f.write("".join(kept).encode("utf-8")))

    def log(self, step, quiet=False, **metrics):
        if not self.enabled:
            return
        record = {"step": step, **{k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}}
        if not quiet:
            print(" | ".join(f"{k} {_fmt(v)}" for k, v in record.items()), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _record(line):
    """A metrics.jsonl line as a dict with a numeric step, or None for anything else (a line cut by a
    kill, a hand edit)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), (int, float)) and \
        not isinstance(record["step"], bool)
    return record if ok else None


def read_metrics(path):
    """The records of a metrics.jsonl; lines that are not records are skipped (keep_until warns of them)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return [r for r in map(_record, f) if r is not None]


def plot_metrics(path, groups, png, title=""):
    """Plot metrics.jsonl: groups is a list of lists of keys, one panel per group."""
    records = read_metrics(path)
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, keys in zip(axes[0], groups):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 40 else None, label=key)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def print_samples(rows, width=100, max_chars=400):
    """rows: dicts with "prompt", "response" and any scores; printed as a readable table."""
    print("-" * width)
    for row in rows:
        scores = "  ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("prompt", "response"))
        print(textwrap.fill("PROMPT: " + row["prompt"], width))
        print(textwrap.fill("RESPONSE: " + row["response"][:max_chars], width, subsequent_indent="  "))
        if scores:
            print("  [" + scores + "]")
        print("-" * width)


def average_ranks(x):
    """Ranks 1..n of the values of x, tied values sharing the mean of the ranks they span:
    [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]. Word counts, gold scores of empty responses and
    gushing-word counts tie often, so ranking ties by position would invent an order."""
    import numpy as np
    _, index, counts = np.unique(np.asarray(x, dtype=float), return_inverse=True, return_counts=True)
    below = np.cumsum(counts) - counts  # how many values are smaller than each distinct value
    return (below + (counts + 1) / 2)[index.reshape(-1)]


def spearman(x, y):
    """Spearman rank correlation: the Pearson correlation of the average ranks; nan when either
    side is constant (no order to correlate)."""
    import numpy as np
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])
