from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from step_ray.config import ConfigError, config_from_yaml, config_to_yaml, job_config, load_config
from step_ray.data.pix2pix import DataConfig


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)


@dataclass(frozen=True)
class Example:
    name: str = "x"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    limit: Optional[int] = None
    optim: Optim = field(default_factory=Optim)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\noptim:\n  lr: 0.5\ndata:\n  image_size: 32\n")
    cfg = load_config(Example, f, ["optim.betas=[0.5, 0.9]", "mode=b", "optim.lr=1e-4", "limit=3"])
    assert cfg.steps == 5 and cfg.mode == "b" and cfg.limit == 3
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.betas == (0.5, 0.9)
    assert cfg.data.image_size == 32 and cfg.data.direction == "AtoB"
    with pytest.raises(Exception):
        cfg.steps = 3  # frozen


def test_round_trip_through_yaml():
    cfg = load_config(Example, None, ["optim.lr=0.25", "data.root=s3://b/p"])
    assert config_from_yaml(Example, config_to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key 'lrr' for Optim; did you mean 'lr'"),
        ("stepz=1", "unknown config key 'stepz'"),
        ("steps=many", "Example.steps: expected an integer, got 'many'"),
        ("mode=c", "'c' is not one of ['a', 'b']"),
        ("steps=-1", "steps must be >= 0"),
        ("data.direction=up", "is not one of ['AtoB', 'BtoA']"),
        ("optim.betas=[1]", "expected 2 items"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_config_names_the_problem(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(Example, None, [override])
    assert message in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Example, tmp_path / "nope.yaml")


def test_job_config_cli(capsys):
    cfg = job_config(Example, ["steps=7", "--optim.lr", "0.1", "--mode=b"])
    assert (cfg.steps, cfg.optim.lr, cfg.mode) == (7, 0.1, "b")
    assert "steps=7" in capsys.readouterr().out  # what the resolved config changes is printed at job start
    with pytest.raises(SystemExit) as info:
        job_config(Example, ["nokey=1"])
    assert info.value.code == 2
    assert "unknown config key 'nokey'" in capsys.readouterr().err


@dataclass(frozen=True)
class WithSectionDefaults:
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5))


def test_partial_section_keeps_the_parents_defaults():
    cfg = load_config(WithSectionDefaults, None, ["optim.betas=[0.1, 0.2]"])
    assert cfg.optim.lr == 0.5 and cfg.optim.betas == (0.1, 0.2)


def test_job_start_prints_what_differs_from_the_defaults_and_verbose_prints_all(capsys, monkeypatch):
    from step_ray.config import VERBOSE_ENV, job_config, verbose

    monkeypatch.setenv(VERBOSE_ENV, "0")  # restored after the test: --verbose sets it for the processes a job starts
    cfg = job_config(Example, ["data.image_size=48", "--optim.lr", "0.5"])
    out = capsys.readouterr().out
    assert cfg.data.image_size == 48 and not verbose()
    assert out.count("\n") == 1 and "data.image_size=48" in out and "optim.lr=0.5" in out, out
    job_config(Example, ["--verbose"])
    out = capsys.readouterr().out
    assert verbose() and out.startswith("# Example") and "image_size:" in out


def test_a_job_with_required_paths_still_prints_one_line_of_changes(capsys, monkeypatch):
    """A job config that has no default instance (its paths are required) is compared field by field."""
    from step_ray.config import VERBOSE_ENV
    from step_ray.pipelines.translate import TranslateJobConfig

    monkeypatch.setenv(VERBOSE_ENV, "0")
    job_config(TranslateJobConfig, ["checkpoint=c", "input=i", "output=o", "style.samples=2"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "checkpoint=c, input=i, output=o, style.samples=2 (" in out, out
