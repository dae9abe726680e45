"""Typed, frozen configuration: nested dataclasses loaded from YAML with `a.b=value` overrides.

Every stage has one frozen dataclass. `load_config` builds it from defaults, then an optional YAML
file, then command-line overrides, and rejects unknown keys and wrong types with one clear line.
Validation of value ranges lives in each dataclass's `__post_init__` (as torchtitan does), so an
impossible config fails before any expensive work. The resolved config is saved with every checkpoint.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, impossible value, unreadable file."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, base: Any = None) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless.

    `base` is the field's default: a partial mapping for a nested config changes only the keys it
    names, so a parent's own defaults for that section (its default_factory) are kept.
    """
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(type(base) if isinstance(base, tp) else tp, value, where=where, base=base)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _unknown_key_error(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown config key '{key}' for {cls.__name__}{hint}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def config_from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config", base: Any = None) -> T:
    """Build `cls` from a (possibly partial) mapping over `base` (or the defaults); unknown keys and
    wrong types are errors."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    if base is not None:
        kwargs = {name: getattr(base, name) for name, f in fields.items() if f.init}
    for key, value in data.items():
        if key not in fields:
            raise _unknown_key_error(cls, key, where)
        default = kwargs[key] if key in kwargs else _field_default(fields[key])
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key, base=default)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    # YAML reads "1e-3" as a string; a number was meant.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Defaults <- `base` (a named preset, e.g. a variant) <- YAML file <- `key=value` overrides; returns
    the frozen, validated dataclass."""
    tree: dict[str, Any] = copy.deepcopy(dict(base or {}))  # overrides must not change the preset
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        tree = _merge(tree, loaded)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return config_from_dict(cls, tree, where=cls.__name__)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def config_from_yaml(cls: type[T], text: str) -> T:
    return config_from_dict(cls, yaml.safe_load(text) or {}, where=cls.__name__)


# Set by a job's `--verbose`: Ray's own INFO logs (Ray Train's per-report records, Ray Data's progress)
# and the whole resolved config on the console. An environment variable, so that every process the job
# starts on this machine sees it; it changes what is printed, never what is computed.
VERBOSE_ENV = "STEP_RAY_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _default_tree(cls: type) -> dict[str, Any]:
    """The field defaults of a config class as a mapping, without building (and so validating) the class
    itself: a job whose paths are required has no default instance, but each field has a default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        out[f.name] = config_to_dict(value)  # plain: nested configs as mappings, tuples as lists
    return out


def changed_from_defaults(cfg: Any) -> list[str] | None:
    """`key=value` for every leaf of `cfg` that differs from its class's defaults (None when they cannot be
    read)."""
    try:
        defaults = _flat(_default_tree(type(cfg)))
    except (TypeError, ValueError, ConfigError):
        return None
    return [f"{k}={v}" for k, v in _flat(config_to_dict(cfg)).items() if defaults.get(k, object()) != v]


def job_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "",
               base: Mapping[str, Any] | None = None) -> T:
    """Command-line entry for jobs: `--config FILE` and any number of `key=value` overrides, over `base`.

    Prints what the resolved config changes from the defaults at job start (the whole config with
    `--verbose`, which also lets Ray's own logs through). Exits with one clear line on a config error.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", help="YAML file with any subset of the config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3")
    parser.add_argument("--verbose", action="store_true", help="the whole resolved config and Ray's own logs")
    args, unknown = parser.parse_known_args(argv)
    # `--train.lr=1e-3` and `--train.lr 1e-3` are accepted as overrides too.
    extra: list[str] = []
    i = 0
    while i < len(unknown):
        tok = unknown[i]
        if tok.startswith("--") and "=" not in tok:
            if i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
                extra.append(f"{tok[2:]}={unknown[i + 1]}")
                i += 2
            else:  # a bare switch: `--run.resume` means run.resume=true
                extra.append(f"{tok[2:]}=true")
                i += 1
            continue
        if tok.startswith("--") and "=" in tok:
            extra.append(tok[2:])
            i += 1
            continue
        parser.error(f"unrecognised argument {tok}")
    try:
        cfg = load_config(cls, args.config, list(args.overrides) + extra, base=base)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    changed = None if verbose() else changed_from_defaults(cfg)
    if changed is None:
        print(f"# {cls.__name__}\n{config_to_yaml(cfg)}", flush=True)
    else:
        print(f"[config] {cls.__name__}: {', '.join(changed) if changed else 'the defaults'} "
              "(saved with every checkpoint; the whole config: --verbose)", flush=True)
    return cfg


def merge_trees(*trees: Mapping[str, Any]) -> dict[str, Any]:
    """Later mappings win, nested mappings merge key by key; the inputs are not changed."""
    out: dict[str, Any] = {}
    for tree in trees:
        out = _merge(out, copy.deepcopy(dict(tree)))
    return out


def dotted_to_tree(values: Mapping[str, Any]) -> dict[str, Any]:
    """{"train.lambda_l1": 10} -> {"train": {"lambda_l1": 10}}."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        _set_dotted(tree, key, value)
    return tree
