"""Constitutional AI's RL phase (RLAIF): an AI labeller that compares two continuations under a
written constitution (data/constitution.md) and gives a soft label. docs/constitution.md explains it.

The mechanics (Bai et al. 2022, section 4.1; Lee et al. 2023):
  * one principle is drawn at random for every comparison (the paper's "ensembling" over principles);
  * the feedback model reads a multiple-choice prompt: the context, the principle's question,
    options (A) and (B), then "The answer is (";
  * P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) from its log-probabilities of "A" and "B": a soft label;
  * a second pass with the options swapped, averaged with the first (RLAIF): a taste for one position
    helps each response once, so it no longer decides which one wins;
  * optionally the label is clamped (Bai et al. clamp to 40-60% when the labeller reasons first).

Two feedback models behind one interface (option_logprobs(requests) -> (N, 2) log-scores of A and B):
  LMFeedback     any causal LM of this project (a nanorlhf checkpoint, or GPT-2's weights: --labeler_dir gpt2)
  RulesFeedback  one small stated check per principle (nanorlhf/rules.py): a stand-in for a capable feedback model

python -m nanorlhf.constitution --prefs out/rm/prefs.jsonl --labeler rules      # agreement with gold
python -m nanorlhf.constitution --prefs out/rm/prefs.jsonl --labeler lm --labeler_dir out/sft
python -m nanorlhf.constitution --prefs out/rm/prefs.jsonl --labeler lm --labeler_dir gpt2   # needs internet once
"""
import argparse
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from nanorlhf.checkpoint import CheckpointError, load_policy
from nanorlhf.model import GPT2_NAMES, load_pretrained_gpt2
from nanorlhf.tokenizer import gpt2_encoding
from nanorlhf.judge import gold_score
from nanorlhf.prefs import PreferenceFileError, read_prefs
from nanorlhf.raters import make_rater_pool, rater_prefers
from nanorlhf.rules import RulesFeedback, response_text

DEFAULT_CONSTITUTION = "data/constitution.md"
LINE = re.compile(r"^- ([a-z0-9_]+):\s*(\S.*)$")  # "- name: question"


@dataclass(frozen=True)
class Principle:
    name: str
    question: str


class ConstitutionError(ValueError):
    pass


def parse_constitution(text, path="constitution"):
    """Principles from the lines "- name: question"; every other line is ignored."""
    principles, problems, seen = [], [], {}
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.startswith("- "):
            continue
        m = LINE.match(line.rstrip())
        if not m:
            problems.append(f"line {line_no}: a principle is '- name: question' with a lowercase name "
                            f"(letters, digits, _), got {line.strip()!r}")
        elif m.group(1) in seen:
            problems.append(f"line {line_no}: principle '{m.group(1)}' is already on line {seen[m.group(1)]}; "
                            f"give each principle its own name")
        else:
            seen[m.group(1)] = line_no
            principles.append(Principle(m.group(1), m.group(2).strip()))
    if problems:
        raise ConstitutionError(f"{path}: {len(problems)} bad principle line(s); fix them and rerun:\n  "
                                + "\n  ".join(problems))
    if not principles:
        raise ConstitutionError(f"{path}: no principles; add lines '- name: question' (see {DEFAULT_CONSTITUTION})")
    return principles


def load_constitution(path=DEFAULT_CONSTITUTION):
    """A relative path that is not under the working directory is read from the repository root."""
    repo_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
    path = repo_path if not os.path.exists(path) and os.path.exists(repo_path) else path
    try:
        with open(path, encoding="utf-8") as f:
            return parse_constitution(f.read(), path)
    except FileNotFoundError:
        raise ConstitutionError(f"no constitution at {path}: pass --constitution {DEFAULT_CONSTITUTION} "
                                f"or a file in its format") from None


# ---------------------------------------------------------------- the multiple-choice prompt

def prompt_pieces(context, question, first, second):
    """The prompt in five pieces: head, option A's text, the line between, option B's text, tail.
    LMFeedback cuts the two options to fit its context window, so they stay separate here."""
    return (f"Consider the following beginning of a story: {context}\n{question}\nOptions:\n(A) ",
            first, "\n(B) ", second, "\nThe answer is (")


def render_prompt(context, question, first, second):
    """The multiple-choice prompt the feedback model reads (Bai et al. 2022, section 4.1)."""
    return "".join(prompt_pieces(context, question, first, second))


# ---------------------------------------------------------------- feedback model 2: a language model

def load_feedback_model(where, device):
    """--labeler_dir: a nanorlhf checkpoint dir (sft, ppo, dpo), or a GPT-2 size (gpt2, gpt2-medium, gpt2-large,
    gpt2-xl): OpenAI's weights from the Hugging Face hub (downloaded once) with tiktoken's GPT-2 encoding."""
    if where in GPT2_NAMES and not os.path.isdir(where):
        try:
            enc = gpt2_encoding()  # first: a missing tokenizer fails before a long download
            return load_pretrained_gpt2(where).to(device).eval(), enc
        except RuntimeError as e:
            raise ConstitutionError(f"--labeler_dir {where}: {e}") from None
    return load_policy(where, device, flag="--labeler_dir")[:2]


class LMFeedback:
    """A causal LM (nanorlhf GPT) read as in the paper: log P("A") and log P("B") as the next token after
    the prompt. Each option is cut to half of the room its context window leaves (block_size)."""

    def __init__(self, model, enc, batch_size=16):
        self.model, self.enc, self.batch_size = model.eval(), enc, batch_size
        self.block_size = model.config.block_size
        ids = [enc.encode_ordinary(c) for c in ("A", "B")]
        if any(len(i) != 1 for i in ids):
            raise ConstitutionError(f"the labeller's tokenizer splits 'A' or 'B' into several tokens ({ids}); "
                                    f"use a tokenizer with single-letter tokens (tiktoken gpt2, this project's BPE)")
        self.option_ids = [ids[0][0], ids[1][0]]

    def missing(self, principles):
        return []  # a language model reads any question

    def tokens(self, request):
        head, first, mid, second, tail = prompt_pieces(request["context"], request["question"],
                                                       response_text(request["first"]), response_text(request["second"]))
        head, mid, tail = (self.enc.encode_ordinary(s) for s in (head, mid, tail))
        room = (self.block_size - len(head) - len(mid) - len(tail)) // 2
        if room < 1:
            head = head[-(self.block_size - len(mid) - len(tail) - 2):]  # a long context loses its start
            room = 1
        first, second = (self.enc.encode_ordinary(s)[:room] for s in (first, second))
        return head + first + mid + second + tail

    @torch.no_grad()
    def option_logprobs(self, requests):
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(requests), self.batch_size):
            rows = [self.tokens(r) for r in requests[i:i + self.batch_size]]
            width = max(map(len, rows))
            idx = torch.tensor([r + [self.enc.eot_token] * (width - len(r)) for r in rows], device=device)
            logits = self.model(idx)  # right padding: a causal model's earlier positions never see it
            last = torch.tensor([len(r) - 1 for r in rows], device=device)
            logp = torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1)
            out.append(logp[:, self.option_ids].double().cpu().numpy())
        return np.concatenate(out)


# ---------------------------------------------------------------- the labeller

def soft_label(logprobs):
    """(N, 2) log-scores of A and B -> P(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)) (N,)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(lp[:, 1] - lp[:, 0]))


class AILabeller:
    """Labels pairs under a constitution with a feedback model (RulesFeedback or LMFeedback).
    swap: also ask with the options swapped and average (Lee et al. 2023); clamp: (low, high) or None."""

    def __init__(self, principles, feedback, swap=True, clamp=None):
        missing = feedback.missing(principles)
        if missing:
            raise ConstitutionError(f"the rules labeller has no check for principle(s) {', '.join(missing)}: add one "
                                    f"to RULES in nanorlhf/rules.py, or use --labeler lm")
        if clamp is not None and not 0 <= clamp[0] <= 0.5 <= clamp[1] <= 1:
            raise ConstitutionError(f"the clamp must be low,high with 0 <= low <= 0.5 <= high <= 1, got {clamp}")
        self.principles, self.feedback, self.swap, self.clamp = principles, feedback, swap, clamp

    def label(self, pairs, rng):
        """pairs: (prompt, a, b, a_ended, b_ended) tuples -> P(a is better) (N,) and the principle of each.
        One rng.integers draw per pair picks its principle."""
        drawn = [self.principles[rng.integers(len(self.principles))] for _ in pairs]
        asks = lambda order: [{"context": p, "question": pr.question, "principle": pr.name,
                               "first": x, "second": y, "first_ended": xe, "second_ended": ye}
                              for (p, x, y, xe, ye), pr in zip(order, drawn)]
        p_a = soft_label(self.feedback.option_logprobs(asks(pairs)))
        if self.swap:  # (b, a): the second option is a, so P(a) there is 1 - P(first)
            swapped = [(p, b, a, be, ae) for p, a, b, ae, be in pairs]
            p_a = 0.5 * (p_a + (1.0 - soft_label(self.feedback.option_logprobs(asks(swapped)))))
        if self.clamp is not None:
            p_a = np.clip(p_a, *self.clamp)
        return p_a, [pr.name for pr in drawn]


def make_labeller(kind, constitution=DEFAULT_CONSTITUTION, model=None, enc=None, swap=True, clamp=None,
                  temperature=0.1):
    """kind: "rules" or "lm" (model and enc: the feedback model and its tokenizer)."""
    principles = load_constitution(constitution)
    if kind == "rules":
        return AILabeller(principles, RulesFeedback(temperature), swap, clamp)
    if kind == "lm":
        return AILabeller(principles, LMFeedback(model, enc), swap, clamp)
    raise ConstitutionError(f"--labeler must be rules or lm, got {kind!r}")


def parse_clamp(text):
    """"" -> None; "0.4,0.6" -> (0.4, 0.6)."""
    if not text.strip():
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ConstitutionError(f"--label_clamp must be 'low,high' such as 0.4,0.6 (or empty), got {text!r}") from None
    return low, high


def label_pairs_ai(prompts, responses_per_prompt, ended_per_prompt, labeller, rng, k=2):
    """raters.label_pairs with the AI labeller: the C(k, 2) pairs of each prompt's k responses, each
    labelled with its own principle. chosen is the response the label favours (the first on a tie),
    "p_chosen" its probability, "principle" the question asked; each pair weighs 1 / C(k, 2)."""
    weight = 1.0 / (k * (k - 1) / 2)
    pairs, where = [], []
    for group, (prompt, texts, ended) in enumerate(zip(prompts, responses_per_prompt, ended_per_prompt)):
        if len(texts) != k or len(ended) != k:
            raise ValueError(f"prompt {group}: expected k={k} responses and ended flags, "
                             f"got {len(texts)} and {len(ended)}")
        for i in range(k):
            for j in range(i + 1, k):
                if texts[i] != texts[j]:  # identical texts state no preference
                    pairs.append((prompt, texts[i], texts[j], bool(ended[i]), bool(ended[j])))
                    where.append(group)
    p_first, principles = labeller.label(pairs, rng) if pairs else ([], [])
    rows = []
    for (prompt, a, b, ae, be), p, principle, group in zip(pairs, p_first, principles, where):
        (c, ce), (r, re_) = ((a, ae), (b, be)) if p >= 0.5 else ((b, be), (a, ae))
        rows.append({"prompt": prompt, "chosen": c, "rejected": r, "chosen_ended": ce, "rejected_ended": re_,
                     "p_chosen": float(max(p, 1.0 - p)), "principle": principle, "weight": weight, "group": group})
    return rows


# ---------------------------------------------------------------- agreement with the gold judge

def gold_agreement(rows):
    """Share of rows whose label orders the pair as the gold judge does. A row's label favours "chosen"
    when its "p_chosen" (default 1) is above 1/2, "rejected" below; a label of exactly 1/2 or a gold
    tie counts 1/2. -> (overall, {principle: (agreement, pairs)}, worst first) ("-" for rows without one)."""
    if not rows:
        raise ValueError("gold_agreement needs at least one row")
    hits, by = [], {}
    for row in rows:
        prompt = row.get("prompt", "")
        g = np.sign(gold_score(prompt, row["chosen"], row.get("chosen_ended", True))
                    - gold_score(prompt, row["rejected"], row.get("rejected_ended", True)))
        lab = np.sign(row.get("p_chosen", 1.0) - 0.5)
        hit = 0.5 if g == 0 or lab == 0 else float(g == lab)
        hits.append(hit)
        by.setdefault(row.get("principle", "-"), []).append(hit)
    per = {k: (float(np.mean(v)), len(v)) for k, v in by.items()}
    return float(np.mean(hits)), dict(sorted(per.items(), key=lambda kv: kv[1][0]))


def raters_gold_agreement(rows, raters, rng):
    """The simulated raters on the same pairs: each pair judged by one rater drawn with rng, and the
    share of their choices that agree with gold (ties 1/2), as gold_agreement."""
    relabelled = []
    for row in rows:
        rater = raters[rng.integers(len(raters))]
        keep = rater_prefers(rater, row.get("prompt", ""), row["chosen"], row["rejected"],
                             row.get("chosen_ended", True), row.get("rejected_ended", True), rng)
        relabelled.append({**row, "p_chosen": 1.0 if keep else 0.0, "principle": "-"})
    return gold_agreement(relabelled)[0]


def format_agreement(name, overall, per, n_worst=3):
    worst = ", ".join(f"{k} {a:.2f} ({n})" for k, (a, n) in list(per.items())[:n_worst] if k != "-")
    return f"{name}: agreement with gold {overall:.3f}" + (f" | principles that disagree most: {worst}" if worst else "")


def main():
    """Relabel the pairs of a preference file (say, a simulated-rater run's held-out pairs) with the AI
    labeller and print its agreement with gold beside the simulated raters'."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--prefs", required=True, help="a preference file (train_rm.py's prefs.jsonl)")
    ap.add_argument("--labeler", default="rules", help="rules | lm")
    ap.add_argument("--labeler_dir", default="", help="lm: the feedback model, a nanorlhf checkpoint dir or a "
                                                      "GPT-2 size (gpt2 | gpt2-medium | gpt2-large | gpt2-xl)")
    ap.add_argument("--constitution", default=DEFAULT_CONSTITUTION)
    ap.add_argument("--n_pairs", type=int, default=500, help="pairs to label (the file's last ones)")
    ap.add_argument("--no_swap", action="store_true", help="one pass only (no swapped-order averaging)")
    ap.add_argument("--label_clamp", default="")
    ap.add_argument("--seed", type=int, default=1337)
    args = ap.parse_args()
    try:
        rows = read_prefs(args.prefs)[-args.n_pairs:]
        model = enc = None
        if args.labeler == "lm":
            model, enc = load_feedback_model(args.labeler_dir, "cpu")
        labeller = make_labeller(args.labeler, args.constitution, model, enc, not args.no_swap,
                                 parse_clamp(args.label_clamp))
    except (PreferenceFileError, CheckpointError, ConstitutionError) as e:
        raise SystemExit(str(e))
    rng = np.random.default_rng(args.seed)
    # each pair shown in a random order: in the file "chosen" comes first, and a labeller that favours the
    # first option would otherwise copy the file's labels
    flip = rng.random(len(rows)) < 0.5
    pairs = [(r["prompt"], *((r["rejected"], r["chosen"], r.get("rejected_ended", True), r.get("chosen_ended", True))
                             if f else (r["chosen"], r["rejected"], r.get("chosen_ended", True),
                                        r.get("rejected_ended", True)))) for r, f in zip(rows, flip)]
    p_first, principles = labeller.label(pairs, rng)
    p = np.where(flip, 1.0 - p_first, p_first)  # P(the file's chosen is better)
    ai_rows = [{**r, "p_chosen": float(x), "principle": pr} for r, x, pr in zip(rows, p, principles)]
    overall, per = gold_agreement(ai_rows)
    print(f"{len(rows)} pairs of {args.prefs}")
    print(format_agreement(f"{args.labeler} labeller ({args.labeler_dir or 'rules'}, swap {not args.no_swap})",
                           overall, per, n_worst=len(per)))
    print(f"mean P(the first option shown) {np.mean(p_first):.3f} | mean |P - 1/2| "
          f"{np.mean(np.abs(p - 0.5)):.3f} | labels at exactly 1/2: {np.mean(p == 0.5):.1%}")
    print(f"the file's own labels: agreement with gold {gold_agreement([{**r, 'principle': '-'} for r in rows])[0]:.3f}")
    raters = make_rater_pool(5, 0.02, 0.2)
    print(f"simulated raters (default pool) on the same pairs: {raters_gold_agreement(rows, raters, rng):.3f}")


if __name__ == "__main__":
    main()
