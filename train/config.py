"""Run configuration: typed sections read from YAML, checked at load, with dotted overrides.

A config file is a mapping of sections (`model`, `data`, `distributed`, `optim`, `train`, `lora`). Any key
can be overridden as `section.key=value`, the value read as YAML: `train.steps=10`,
`optim.betas=[0.9,0.99]`, `model.q_lora_rank=null`, `model.rope_scaling.factor=4` (nested keys only in
`model`). Values are checked against the dataclass annotations and the ranges in `train/config_rules.py`;
every mistake raises a one-line `ConfigError` that names the dotted key, the value and what was expected.
The sections are the dataclasses of `train/config_sections.py`; each field's docstring is its entry in
the configuration reference (`python -m train.config_reference`).

The `model` section keeps only the keys the user set (any `MLAConfig` field, plus `pretrained`); the
trainer merges them with the `MLAConfig` defaults and the tokenizer's vocabulary size. YAML is read as
YAML 1.2 reads numbers: `1e-8` is a float (PyYAML's YAML 1.1 rules make it a string).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from models.config import MLAConfig
from train.config_rules import (
    BOOL_ALIASES,
    INVALID,
    RULES,
    ConfigError,
    YamlDumper,
    YamlLoader,
    _warned_deprecated,  # noqa: F401  (tests reset the warn-once set)
    broken_relation,
    convert,
    describe,
    one_line,
    plain,
    rename_deprecated,
    unknown_name,
)
from train.config_sections import (
    Config,
    DataConfig,
    DistributedConfig,
    LoraConfig,
    OptimConfig,
    TrainConfig,
)
from train.schedules import check_curriculum

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "LoraConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
]


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "distributed": DistributedConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "lora": LoraConfig,
}
SECTION_NAMES = ["model", *SECTIONS]
MODEL_EXTRA_KEYS: dict[str, Any] = {"pretrained": str | None}
OVERRIDE_FORM = "expected section.key=value, e.g. train.steps=10 or model.rope_scaling.factor=4"


def _check_section(name: str, raw: Any, hints: dict[str, Any]) -> dict[str, Any]:
    """The typed, range-checked values of one section (only the keys present in `raw`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}={raw!r}: expected a mapping of keys")
    values = {}
    for key, value in rename_deprecated(name, raw).items():
        if key not in hints:
            raise unknown_name("key", f"{name}.", key, list(hints))
        dotted = f"{name}.{key}"
        if isinstance(value, bool) and dotted in BOOL_ALIASES:
            value = BOOL_ALIASES[dotted][value]
        typed = convert(value, hints[key])
        if typed is INVALID:
            raise ConfigError(f"{dotted}={value!r}: expected {describe(hints[key])}")
        check, expected = RULES.get(dotted, (None, ""))
        if check is not None and typed is not None and not check(typed):
            raise ConfigError(f"{dotted}={value!r}: expected {expected}")
        values[key] = typed
    return values


def _check_model(raw: Any) -> dict[str, Any]:
    hints = {**typing.get_type_hints(MLAConfig), **MODEL_EXTRA_KEYS}
    model = _check_section("model", raw, hints)
    shape = {k: v for k, v in model.items() if k not in MODEL_EXTRA_KEYS}
    try:
        MLAConfig(**shape)
    except (TypeError, ValueError) as err:
        message = one_line(err)
        if not message.startswith("model."):
            # only a malformed value inside rope_scaling fails before MLAConfig can name it
            message = f"model.rope_scaling={shape.get('rope_scaling')!r}: {message}"
        raise ConfigError(message) from None
    return model


def config_from_dict(raw: dict) -> Config:
    """A checked `Config` from a mapping of sections; missing sections and keys take the defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config={raw!r}: expected a mapping of sections ({', '.join(SECTION_NAMES)})")
    for name in raw:
        if name not in SECTION_NAMES:
            raise unknown_name("section", "", name, SECTION_NAMES)
    sections = {
        name: cls(**_check_section(name, raw.get(name), typing.get_type_hints(cls)))
        for name, cls in SECTIONS.items()
    }
    cfg = Config(model=_check_model(raw.get("model")), **sections)
    broken = broken_relation(cfg)
    if broken:
        raise ConfigError(broken)
    tc = cfg.train
    try:
        check_curriculum(
            tc.curriculum_start_seq_len, tc.curriculum_steps, cfg.data.seq_len, tc.curriculum_constant_tokens
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}': no such file")
    try:
        raw = yaml.load(path.read_text(), Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}': invalid YAML ({one_line(err)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file '{path}': expected a mapping of sections ({', '.join(SECTION_NAMES)}), "
            f"got {type(raw).__name__}"
        )
    return raw


def apply_override(raw: dict, override: str) -> None:
    """Set `section.key[.subkey...]=value` in `raw` in place, the value read as YAML."""
    dotted, sep, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r}: {OVERRIDE_FORM}")
    if len(parts) > 2 and parts[0] != "model":
        raise ConfigError(f"override {override!r}: nested keys are allowed only in the model section")
    try:
        value = yaml.load(text, Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({one_line(err)})") from None
    node = raw
    for depth, key in enumerate(parts[:-1]):
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{where}={node[key]!r}: expected a mapping to set {dotted.strip()!r} in")
        node = node[key]
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (defaults when `path` is None), apply `section.key=value` overrides, check it."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(cfg: Config) -> dict:
    """`cfg` as nested dicts of plain YAML types (tuples become lists); `config_from_dict` inverts it."""
    return plain(asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(cfg), Dumper=YamlDumper, sort_keys=False))
