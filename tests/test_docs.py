"""Every command the documentation shows runs as written: the files it names exist, each job accepts the
config keys (and the config file) it passes, each script accepts the flags it passes, and every
"docs/method.md §N" reference names a section that exists. Read from the README, docs/, BENCHMARKS.md,
experiments/README.md, RELIABILITY.md, infra/README.md, the jobs' docstrings and the configs' headers."""
from __future__ import annotations

import ast
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from step_ray.config import load_config
from step_ray.mining.config import MineTripletsJobConfig
from step_ray.eval.generator_eval import EvalConfig
from step_ray.pipelines.pretrain import PretrainJobConfig
from step_ray.pipelines.sweep import SweepJobConfig
from step_ray.pipelines.train_generator import GeneratorJobConfig
from step_ray.pipelines.train_multidomain import MultiDomainJobConfig
from step_ray.pipelines.train_munit import MUNITJobConfig
from step_ray.pipelines.translate import TranslateJobConfig
from step_ray.recipes.variants import VARIANTS, variant_base
from step_ray.style.statistics import StyleStatsConfig

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = {
    "pretrain": PretrainJobConfig, "style_stats": StyleStatsConfig, "mine_triplets": MineTripletsJobConfig,
    "train_generator": GeneratorJobConfig, "train_munit": MUNITJobConfig, "train_multidomain": MultiDomainJobConfig,
    "evaluate": EvalConfig, "sweep": SweepJobConfig, "translate": TranslateJobConfig,
}
# top-level folders whose files the docs name by repository-relative path
TOP = ("configs", "benchmarks", "experiments", "tools", "docs", "jobs", "step_ray", "tests", "infra")
PATH_RE = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*\w)" % "|".join(TOP))
COMMAND_RE = re.compile(r"python3? (jobs|benchmarks|experiments|tools/gpu)/(\w+)\.py\b(.*)")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|…|\bJOB_ID\b|\$")


def doc_sources() -> dict[str, str]:
    """name -> text of everything whose commands and paths are checked."""
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", REPO / "RELIABILITY.md", REPO / "infra" / "README.md",
             REPO / "experiments" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    out = {str(p.relative_to(REPO)): p.read_text() for p in files if p.is_file()}
    for job in sorted((REPO / "jobs").glob("*.py")):
        out[str(job.relative_to(REPO))] = ast.get_docstring(ast.parse(job.read_text())) or ""
    for cfg in sorted((REPO / "configs").rglob("*.yaml")):
        out[str(cfg.relative_to(REPO))] = "\n".join(line.lstrip("# ") for line in cfg.read_text().splitlines()
                                                    if line.lstrip().startswith("#"))
    return out


def commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(folder, script, argv) of every `python <folder>/<script>.py ...` line, continuations joined."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    found = []
    lines = joined.splitlines()
    for at, line in enumerate(lines):
        if at + 1 < len(lines) and lines[at + 1].lstrip().startswith("config error"):
            continue  # an example of the one-line refusal a wrong key gets
        for m in COMMAND_RE.finditer(re.sub(r"<[^<>]*>|\$\([^()]*\)", "<placeholder>", line)):
            rest = re.split(r"\s#\s|\s#$|`|\s\|\s|\s&&\s|\s>\s|;|>$|>\)|\)$", m.group(3))[0]
            try:
                argv = shlex.split(rest)
            except ValueError:  # an unbalanced quote: the line is prose around a command
                argv = rest.split()
            found.append((m.group(1), m.group(2), argv))
    return found


def _split_job_argv(argv: list[str]) -> tuple[str | None, str, list[str]]:
    config, variant, overrides = None, "", []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--config", "--variant") and i + 1 < len(argv):
            config, variant = (argv[i + 1], variant) if tok == "--config" else (config, argv[i + 1])
            i += 2
            continue
        if tok in ("--verbose", "-h", "--help"):
            i += 1
            continue
        if tok == "--resume":  # the jobs' shorthand for run.resume=true
            tok = "run.resume=true"
        if tok.startswith("--") and "=" not in tok:  # `--key value` or a bare switch
            if i + 1 < len(argv) and not argv[i + 1].startswith("--") and "=" not in argv[i + 1]:
                overrides.append(f"{tok[2:]}={argv[i + 1]}")
                i += 2
            else:
                overrides.append(f"{tok[2:]}=true")
                i += 1
            continue
        if "=" in tok or not PLACEHOLDER.search(tok):  # a bare `<placeholder>` or `...` stands for more
            overrides.append(tok[2:] if tok.startswith("--") else tok)
        i += 1
    return config, variant, overrides


def _key_type(cls: type, dotted: str):
    """The annotation of a dotted key (Any inside a free mapping), or None when no such key exists."""
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return typing.Any  # a free mapping (a sweep's trial settings): checked when the trial's job loads it
        if part not in {f.name for f in dataclasses.fields(cls)}:
            return None
        cls = typing.get_type_hints(cls).get(part)
    return cls


def _split_placeholders(cls: type, overrides: list[str]) -> tuple[list[str], list[str]]:
    """The overrides to load (a placeholder value such as `<the checkpoint>`, `$margin` or
    `runs/stage1-.../x` stands for a string; for a key of another type only the key is checked), and the
    keys given a placeholder that do not exist in `cls`."""
    real, unknown = [], []
    for o in overrides:
        key, _, value = o.partition("=")
        if not PLACEHOLDER.search(value):
            real.append(o)
            continue
        kind = _key_type(cls, key)
        if kind is None:
            unknown.append(key)
        elif kind is str:
            real.append(f"{key}=placeholder")
    return real, unknown


def test_the_docs_show_commands_and_every_job_is_known():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py")}
    assert jobs == set(JOB_CONFIGS), "a job without a config class here (or one removed): update JOB_CONFIGS"
    shown = {script for text in doc_sources().values() for folder, script, _ in commands(text) if folder == "jobs"}
    assert {"pretrain", "train_generator", "evaluate", "sweep"} <= shown


def test_every_job_command_in_the_docs_loads_its_config():
    failures = []
    for name, text in doc_sources().items():
        for folder, script, argv in commands(text):
            if folder != "jobs":
                continue
            if script not in JOB_CONFIGS:
                failures.append(f"{name}: no job jobs/{script}.py")
                continue
            config, variant, overrides = _split_job_argv(argv)
            if variant == "list" or any(PLACEHOLDER.search(v or "") for v in (config, variant)):
                continue
            if config and not (REPO / config).is_file():
                failures.append(f"{name}: jobs/{script}.py --config {config}: no such file")
                continue
            if variant and variant not in VARIANTS:
                failures.append(f"{name}: unknown variant {variant}")
                continue
            base = variant_base(variant) if variant else None
            real, unknown = _split_placeholders(JOB_CONFIGS[script], overrides)
            failures += [f"{name}: jobs/{script}.py: no config key {key}" for key in unknown]
            try:
                load_config(JOB_CONFIGS[script], str(REPO / config) if config else None, real, base=base)
            except Exception as exc:  # noqa: BLE001 - any refusal is a doc that does not run
                failures.append(f"{name}: jobs/{script}.py {' '.join(argv)}: {exc}")
    assert not failures, "\n".join(failures)


def _script_flags(path: Path) -> set[str]:
    """The --flags a script's argparse parser declares (read from its source, without running it)."""
    flags = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            flags |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")}
    return flags


def test_every_script_command_in_the_docs_exists_and_takes_its_flags():
    failures = []
    for name, text in doc_sources().items():
        for folder, script, argv in commands(text):
            if folder == "jobs":
                continue
            path = REPO / folder / f"{script}.py"
            if not path.is_file():
                failures.append(f"{name}: {folder}/{script}.py does not exist")
                continue
            flags = _script_flags(path) | {"-h", "--help"}
            for tok in argv:
                flag = tok.split("=", 1)[0]
                if flag.startswith("--") and not PLACEHOLDER.search(flag) and flag not in flags:
                    failures.append(f"{name}: {folder}/{script}.py has no flag {flag}")
    assert not failures, "\n".join(failures)


def test_every_file_the_docs_name_exists():
    missing = []
    for name, text in doc_sources().items():
        for m in PATH_RE.finditer(text):
            path = m.group(1).rstrip(".")
            if text[m.end():m.end() + 1] in ("<", "*", "{", "$", "N") or "/runs/" in path:
                continue  # a pattern (results/gpu_<date>.json, scale/n*.json), not a file
            if not (REPO / path).exists():
                missing.append(f"{name}: {path}")
        if name.endswith(".md"):  # relative Markdown links and pictures
            for target in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                if not ((REPO / name).parent / target).exists():
                    missing.append(f"{name}: link {target}")
    assert not missing, "\n".join(sorted(set(missing)))


@pytest.mark.parametrize("root", ["step_ray", "jobs", "tests", "configs", "benchmarks", "experiments", "tools", "docs"])
def test_method_references_name_existing_sections(root):
    method = (REPO / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", method, flags=re.M)}
    assert sections == set(range(1, 10))
    bad = []
    for path in sorted((REPO / root).rglob("*")):
        if path.suffix not in (".py", ".md", ".yaml", ".sh") or not path.is_file():
            continue
        for m in re.finditer(r"docs/method\.md §([\d.,\s§-]+)", path.read_text()):
            numbers = [int(float(n)) for n in re.findall(r"\d+(?:\.\d+)?", m.group(1))]
            bad += [f"{path.relative_to(REPO)}: §{n}" for n in numbers if n not in sections]
    assert not bad, bad


def test_no_tracker_labels_in_code_or_docs():
    """The docs and code say what a thing is; an issue number points at a tracker no user sees."""
    label = re.compile(r"\bissues? ?#?\d+\b", re.I)
    hits = []
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if rel.parts[0] in (".git", ".venv", "step_ray.egg-info") or rel.parts[0].startswith(".") or not path.is_file():
            continue
        if path.suffix in (".py", ".md", ".yaml", ".sh", ".toml"):
            hits += [f"{rel}: {m.group(0)}" for m in label.finditer(path.read_text())]
    assert not hits, hits
