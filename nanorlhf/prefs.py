"""Preference files: JSONL, one comparison per line.

Two row shapes are read:
  {"prompt": ..., "chosen": ..., "rejected": ..., ...metadata}    our own files
  {"chosen": ..., "rejected": ...}                                  Anthropic-HH style: both texts
                                                                    start with the same conversation
For HH rows the prompt is the longest common prefix of the two texts, cut back to end at
whitespace (so no word is split), and chosen/rejected become the remainders.

Rules (reading is all-or-nothing: a broken file stops the run before it starts):
  * every non-blank line is a JSON object; blank lines are skipped
  * "chosen" and "rejected" are strings, and differ; a response may be empty only when
    its row says it ended ("chosen_ended"/"rejected_ended": true, as train_rm.py writes):
    a policy that answers with <|endoftext|> at once gave an empty but real response
  * "prompt", when present, is a string; it may be empty (a reward model can score a bare
    response, and HH rows whose texts share no prefix get an empty prompt too)
  * "weight", when present, is a number from 1e-6 to 1e6; it defaults to 1.0
  * "group", when present, is a non-negative integer shared by the rows of one ranking; either
    every row has one or none does (a row without one is its own group, numbered by its row)
  * "p_chosen", when present, is a number from 0 to 1: a soft label, the labeller's probability that
    "chosen" is the better one (train_rm.py --feedback constitution writes it; the Bradley-Terry loss
    then takes it as its target); without it the label is hard (1)
  * other keys are kept as metadata
"""
import hashlib
import json
import math

from nanorlhf.io import atomic_write


def split_by_prompt(rows, val_fraction, rng, val_groups=None):
    """Hold out whole prompts: the pairs of one prompt share a "group" (a row without one is its own group,
    numbered by its row). val_fraction of the groups (at least one), drawn with rng, validate; val_groups:
    the split of an interrupted run, reused. -> train_rows, val_rows, val_groups (a set)."""
    if val_groups is None:
        groups = sorted({r.get("group", i) for i, r in enumerate(rows)})
        val_groups = set(rng.permutation(groups)[:max(1, int(len(groups) * val_fraction))].tolist())
    val_rows = [r for i, r in enumerate(rows) if r.get("group", i) in val_groups]
    train_rows = [r for i, r in enumerate(rows) if r.get("group", i) not in val_groups]
    return train_rows, val_rows, val_groups


class PreferenceFileError(ValueError):
    pass


def split_hh(chosen, rejected):
    """-> (prompt, chosen_rest, rejected_rest) with prompt + chosen_rest == chosen.

    The prompt is the longest common prefix cut back until it ends at whitespace
    and leaves both remainders non-empty; "" if there is no such prefix.
    """
    cut = 0
    while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
        cut += 1
    while cut > 0 and not (chosen[cut - 1].isspace() and cut < len(chosen) and cut < len(rejected)):
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e6  # beyond these a weighted mean of losses over- or underflows (1e308 -> inf)


def _check_row(row):
    """The problem with one parsed row, or None if it is fine."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in ("chosen", "rejected"):
        if key not in row:
            return f"missing key '{key}'"
        if not isinstance(row[key], str) or not (row[key] or row.get(f"{key}_ended") is True):
            return f"'{key}' must be a non-empty string (or empty with \"{key}_ended\": true)"
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are the same text"
    if "prompt" in row and not isinstance(row["prompt"], str):
        return "'prompt' must be a string"
    weight = row.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
            not (math.isfinite(weight) and MIN_WEIGHT <= weight <= MAX_WEIGHT):
        return (f"'weight' must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g} (only their ratios matter), "
                f"got {weight!r}")
    if "p_chosen" in row:
        p = row["p_chosen"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and 0 <= p <= 1):
            return f"'p_chosen' must be a number from 0 to 1 (the probability that chosen is better), got {p!r}"
    # train_rm.py and train_dpo.py sort groups beside the row indices that number ungrouped rows,
    # and --extra_prefs adds the new prompt count: a negative group would join a new prompt's
    group = row.get("group", 0)
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        return f"'group' must be a non-negative integer (rows of one ranking share it), got {group!r}"
    return None


def _normalise(row):
    row = dict(row)
    if "prompt" not in row:
        row["prompt"], row["chosen"], row["rejected"] = split_hh(row["chosen"], row["rejected"])
    row["weight"] = float(row.get("weight", 1.0))
    return row


def read_prefs(path):
    """Read and validate a preference file -> list of {"prompt", "chosen", "rejected", "weight", ...}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise PreferenceFileError(f"no preference file at {path}: pass a JSONL file of "
                                  '{"prompt", "chosen", "rejected"} rows') from None
    except UnicodeDecodeError as e:
        raise PreferenceFileError(f"{path}: not UTF-8 text ({e})") from None
    rows, problems, grouped = [], [], {}  # grouped: has a "group" -> first line that does
    for line_no, line in enumerate(text.split("\n"), start=1):  # JSON strings cannot hold a raw "\n"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {line_no}: not valid JSON: {e}")
            continue
        problem = _check_row(row)
        if problem:
            problems.append(f"line {line_no}: {problem}")
        else:
            rows.append(_normalise(row))
            grouped.setdefault("group" in row, line_no)
    if len(grouped) == 2:  # a row numbered by its index could land in a real group: refuse the mix
        problems.append(f"line {grouped[False]}: no 'group', but line {grouped[True]} has one; "
                        f"give every row a 'group' or none")
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        raise PreferenceFileError(f"{path}: {len(problems)} bad row(s); fix them and rerun:\n  {shown}")
    if not rows:
        raise PreferenceFileError(f"{path}: the file has no rows; expected one JSON object per line")
    return rows


def prefs_digest(rows):
    """A fingerprint of the pairs (sha256 of their JSON): a resumed run checks that it trains on the same ones."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_prefs(path, rows):
    """Write rows as JSONL atomically (io.atomic_write: a temp file in the same folder, fsync, rename)."""
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
