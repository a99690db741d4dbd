"""The package's shape (docs/design.md, "Package rules"): every module imports on its own, no import
cycle among nanorlhf modules, files stay short, every config field has its --help text, and every
"detail N" the code cites is in docs/design.md."""
import ast
import dataclasses
import os
import re
import shutil
import subprocess
import sys

import pytest

from nanorlhf import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "nanorlhf")
MODULES = sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


def nanorlhf_imports(path):
    """The nanorlhf modules a source file imports, at any depth (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanorlhf"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from nanorlhf import x
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nanorlhf."))
    return found


def find_cycle(package_dir):
    """An import cycle among the modules of package_dir as a list [a, b, ..., a], or None."""
    names = [n[:-3] for n in os.listdir(package_dir) if n.endswith(".py") and n != "__init__.py"]
    graph = {n: sorted(nanorlhf_imports(os.path.join(package_dir, n + ".py")) & set(names)) for n in names}
    state = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(names):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_every_module_imports_alone_in_a_fresh_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import nanorlhf.{m}"], cwd=ROOT, env=env,
                                 stderr=subprocess.PIPE, text=True) for m in MODULES}
    failed = {m: p.communicate()[1].strip().splitlines()[-1:] for m, p in procs.items() if p.wait() != 0}
    assert not failed, failed


def test_no_import_cycle_among_nanorlhf_modules():
    assert find_cycle(PACKAGE) is None


def test_a_planted_import_cycle_is_found(tmp_path):
    copy = tmp_path / "nanorlhf"
    shutil.copytree(PACKAGE, copy)
    assert find_cycle(copy) is None
    with open(copy / "io.py", "a") as f:  # io is imported by checkpoint, which imports model and tokenizer ...
        f.write("\n\ndef late():\n    from nanorlhf.checkpoint import ckpt_path  # a lazy import still counts\n")
    cycle = find_cycle(copy)
    assert set(cycle) == {"checkpoint", "io"} and cycle[0] == cycle[-1]


def test_files_stay_short():
    long = {m: n for m in MODULES if (n := len(open(os.path.join(PACKAGE, m + ".py")).readlines())) > 350}
    assert not long, f"over 350 lines: {long}"
    script = open(os.path.join(ROOT, "train_ppo.py")).read().splitlines()
    assert len(script) <= 200
    assert next(i for i, line in enumerate(script) if line.startswith("for iteration in")) < 100


def test_every_config_field_has_help_text():
    for cls in (config.SFTConfig, config.RMConfig, config.PPOConfig, config.PGConfig, config.DPOConfig,
                config.EvalConfig, config.StudyConfig, config.FrontierConfig):
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("help")]
        assert not missing, f"{cls.__name__}: {missing}"


def test_every_cited_detail_is_in_design_md():
    design = open(os.path.join(ROOT, "docs", "design.md")).read()
    section = design.split("## The details that make PPO work")[1].split("\n## ")[0]
    numbered = {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.M)}
    assert numbered == set(range(1, 12))
    cited, stale = set(), []
    for folder, _, files in os.walk(ROOT):
        if any(part.startswith(".") for part in folder.split(os.sep)) or "out" in folder.split(os.sep):
            continue
        for name in files:
            if name.endswith((".py", ".md")) and name not in ("README.md", "test_layout.py"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                for m in re.finditer(r"\bdetails? (\d+(?:(?:, | and )\d+)*)", text):
                    cited.update(int(n) for n in re.findall(r"\d+", m.group(1)))
                if "DESIGN detail" in text or "DESIGN.md" in text:
                    stale.append(name)
    assert cited and cited <= numbered, sorted(cited - numbered)
    assert not stale, f"cite docs/design.md instead of a DESIGN file outside the repository: {stale}"
