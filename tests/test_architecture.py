"""The structure the code promises (docs/architecture.md): layers import downwards only, no import
circles, no hidden in-function imports of our own modules, thin jobs, one epoch loop; and the engine's
contract, exercised with a recipe written here the way a newcomer would write one."""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "step_ray"
# lowest first; a module may import its own layer and the ones before it
LAYERS = ("config", "storage", "weights", "prometheus", "cluster", "checkpoints", "data", "models", "style", "mining",
          "losses", "eval", "engine", "recipes", "pipelines", "preflight")


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _imports(path: Path):
    """(imported step_ray module, line, inside a function?, the source line) for every import of ours."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("step_ray"):
            names = [node.module] if node.module != "step_ray" else [f"step_ray.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("step_ray")]
        for name in names:
            yield name, node.lineno, id(node) in nested, lines[node.lineno - 1]


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_downwards_only_and_without_circles():
    graph: dict[str, set[str]] = {}
    upward = []
    for path in PACKAGE.rglob("*.py"):
        mod = _module_name(path)
        for target, line, in_function, _ in _imports(path):
            if (_layer(mod) in LAYERS and _layer(target) in LAYERS
                    and LAYERS.index(_layer(target)) > LAYERS.index(_layer(mod))):
                upward.append(f"{mod}:{line} imports {target}")
            if not in_function:
                graph.setdefault(mod, set()).add(target)
    assert not upward, upward
    # a circle among module-level imports (a package's __init__ counts as the package)
    known = set(graph) | {t for ts in graph.values() for t in ts}
    state: dict[str, int] = {}
    circles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in known:
                continue
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(known):
        if not state.get(node):
            visit(node, [node])
    assert not circles, circles
    assert {"step_ray.engine.loop", "step_ray.recipes.generator", "step_ray.pipelines.train_generator"} <= known


def test_no_hidden_in_function_imports_of_our_own_modules():
    """An import of ours inside a function is allowed only where it defers an expensive dependency on
    purpose, and then its line says so."""
    hidden = [f"{path.relative_to(REPO)}:{line}: {text.strip()}" for path in PACKAGE.rglob("*.py")
              for _, line, in_function, text in _imports(path) if in_function and "deferred" not in text]
    assert not hidden, hidden


def test_jobs_are_thin_and_edit_no_sys_path():
    for job in (REPO / "jobs").glob("*.py"):
        text = job.read_text()
        assert "sys.path" not in text, job
        tree = ast.parse(text)
        targets = {name for name, *_ in _imports(job)}
        assert all(_layer(t) in ("pipelines", "preflight", "config", "cluster", "recipes", "style", "mining", "eval",
                                 "checkpoints") for t in targets), (job, targets)
        assert sum(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body) <= 3, job


def test_no_recipe_loops_over_epochs():
    """The epoch loop is written once (step_ray.engine.loop). The IMLE mapper is the exception on purpose:
    an MLP fitted in-process in seconds, with no Ray Train run, so it has no engine loop to use."""
    for path in (PACKAGE / "recipes").glob("*.py"):
        if path.name == "mapper.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.For, ast.While)):
                source = ast.unparse(node.iter if isinstance(node, ast.For) else node.test)
                assert "epoch" not in source, f"{path.name}:{node.lineno} loops over epochs: {source}"
    loop = (PACKAGE / "engine" / "loop.py").read_text()
    assert loop.count("while state[\"epoch\"] < cfg.max_epochs") == 1


def test_loop_settings_are_defined_once_and_shared():
    from dataclasses import fields

    from step_ray.engine.settings import LoopConfig
    from step_ray.recipes.generator import GeneratorTraining
    from step_ray.recipes.multidomain import MultiDomainTraining
    from step_ray.recipes.munit import MUNITTraining
    from step_ray.recipes.stage1 import Stage1Training

    loop = {f.name for f in fields(LoopConfig)}
    for cls in (Stage1Training, GeneratorTraining, MUNITTraining, MultiDomainTraining):
        assert issubclass(cls, LoopConfig) and loop <= {f.name for f in fields(cls)}, cls
    # the official defaults differ per method, and stay each method's own
    assert (Stage1Training().batch_size, MUNITTraining().batch_size, GeneratorTraining().batch_size) == (12, 1, 8)


def test_settings_a_job_decides_are_refused_not_overwritten():
    from step_ray.config import ConfigError, load_config
    from step_ray.pipelines.pretrain import PretrainJobConfig
    from step_ray.pipelines.train_generator import GeneratorJobConfig

    for setting, hint in (("train.max_epochs=3", "stage2_epochs"), ("train.decay_epochs=2", "stage3_decay_epochs"),
                          ("train.init_checkpoint=x", "stage2_checkpoint"), ("train.encoder_checkpoint=x", "top level"),
                          ("train.train_encoder=true", "joint stage"), ("eval.checkpoint=x", "jobs/evaluate.py"),
                          ("eval.split=test", "val_split")):
        with pytest.raises(ConfigError, match=hint):
            load_config(GeneratorJobConfig, None, [setting])
    # a baseline's joint stage trains E by its preset, and evaluation can be switched off with settings left
    load_config(GeneratorJobConfig, None, ["train.encoder_init=scratch", "train.train_encoder=true"])
    load_config(GeneratorJobConfig, None, ["evaluate=false", "eval.split=test"])
    with pytest.raises(ConfigError, match="reads its dataset from `data`"):
        load_config(PretrainJobConfig, None, ["style.data.root=/somewhere"])
    assert load_config(PretrainJobConfig, None, ["data.root=/somewhere"]).data.root == "/somewhere"


# ----------------------------------------------------------------------------------------------------
# the engine's contract, with a recipe of a few lines


def _toy_recipe_classes():
    from step_ray.engine.loop import Recipe, epoch_batches
    from step_ray.engine.settings import LoopConfig

    @dataclass(frozen=True)
    class LineConfig(LoopConfig):
        lr: float = 0.5
        scores: tuple[float, ...] = (3.0, 1.0, 2.0, 2.0, 2.0, 2.0)  # what validation reports at each epoch

    @dataclass
    class LineRecipe(Recipe):
        """Fit y = 2x; validation reports a fixed score per epoch (so the bookkeeping is predictable)."""

        cfg: LineConfig
        name: str = "line"

        def build(self, w):
            return {"line": torch.nn.Linear(1, 1)}

        def make_optimizers(self, w, modules):
            self.net = modules["line"]
            self.opt = torch.optim.SGD(self.net.parameters(), lr=self.cfg.lr)
            return {"optimizer": self.opt}

        def batches(self, w, epoch, streams):
            return [(len(r), r)
                    for r in epoch_batches(16, self.cfg.batch_size, [self.cfg.seed, epoch], w.rank, w.world)]

        def step(self, w, rows, state, guard):
            x = torch.as_tensor(rows, dtype=torch.float32)[:, None] / 16
            loss = ((self.net(x) - 2 * x) ** 2).mean()
            self.opt.zero_grad()
            if not guard.finite(state, "loss", loss):
                return None
            loss.backward()
            self.opt.step()
            return {"loss": float(loss)}

        def validate(self, w, state):
            return {"val_score": self.cfg.scores[state["epoch"]], "val_slope": float(self.net.weight)}

    return LineConfig, LineRecipe


def test_a_new_recipe_gets_resume_budgets_patience_and_the_one_checkpoint_schema(ray_session, tmp_path):
    import ray.cloudpickle

    from step_ray import checkpoints
    from step_ray.engine.loop import train
    from step_ray.engine.settings import RunSettings

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    LineConfig, LineRecipe = _toy_recipe_classes()
    run = RunSettings(storage_path=str(tmp_path / "runs"), name="line", checkpoint_metric="val_score",
                      checkpoint_mode="min", keep_checkpoints=10, max_failures=0)
    off = {"monitor": {"enabled": False}}
    from step_ray.config import config_from_dict

    # patience 2: epoch 1 is best (1.0), epochs 2 and 3 are not better, so the run stops after epoch 3
    cfg = config_from_dict(LineConfig, {"batch_size": 4, "max_epochs": 6, "patience": 2, **off})
    result, run_uri = train(LineRecipe(cfg), run)
    state = yaml.safe_load((Path(result.checkpoint.path) / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2, 3] and "val_score for 2 epochs" in state["stopped"]
    assert state["best"] == 1.0 and state["step"] == 16 and state["stage"] == "line"
    assert state["history"][-1]["train_loss"] < state["history"][0]["train_loss"] / 2  # it did learn
    record = yaml.safe_load((Path(result.checkpoint.path) / "config.yaml").read_text())
    assert set(record) == {"method", "run", "recipe"} and record["method"] == "line"
    assert record["recipe"]["patience"] == 2 and record["run"]["checkpoint_mode"] == "min"
    # the checkpoint CLI ranks by the run's own metric and mode (config.yaml), not a default
    assert checkpoints.best_checkpoint(run_uri).name == "checkpoint_epoch0001"

    # resumed with a step budget: it continues from step 16 and stops at the budget, mid-epoch
    cfg2 = config_from_dict(LineConfig, {"batch_size": 4, "max_epochs": 6, "max_steps": 22, **off})
    result2, _ = train(LineRecipe(cfg2), RunSettings(**{**run.__dict__, "resume": True}))
    state2 = yaml.safe_load((Path(result2.checkpoint.path) / "state.json").read_text())
    assert state2["restarts"] == [{"epoch": 4, "step": 16}]
    assert state2["step"] == 22 and [h["epoch"] for h in state2["history"]][4:] == [4, 5]
    assert state2["history"][-1]["step"] == 22 and "step budget 22" in state2["stopped"]
    assert np.isfinite(state2["history"][-1]["train_loss"])
