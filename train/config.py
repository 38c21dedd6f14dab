"""Run configuration: typed sections read from YAML, checked at load, with dotted overrides.

A config file is a mapping of sections (`model`, `data`, `distributed`, `optim`, `train`, `lora`). Any key
can be overridden as `section.key=value`, the value read as YAML: `train.steps=10`,
`optim.betas=[0.9,0.99]`, `model.q_lora_rank=null`, `model.rope_scaling.factor=4` (nested keys only in
`model`). Values are checked against the dataclass annotations and ranges below; every mistake raises a
one-line `ConfigError` that names the dotted key, the value and what was expected.

The `model` section keeps only the keys the user set (any `MLAConfig` field, plus `pretrained`); the
trainer merges them with the `MLAConfig` defaults and the tokenizer's vocabulary size.

YAML is read as YAML 1.2 reads numbers: `1e-8` is a float (PyYAML's YAML 1.1 rules make it a string).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import MLAConfig
from train.schedules import check_curriculum


class ConfigError(ValueError):
    """A bad config file, override, key or value; the message is one line naming the dotted key."""


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # "stdlib" (built-in) or a path to a text file / folder
    tokenizer: str | None = None  # path to a tokenizer.json; None = train one and cache it
    vocab_size: int = 2048  # target size when training the tokenizer
    seq_len: int = 128
    cache_dir: str = ".cache/mla-parallel"
    max_corpus_mb: float | None = 4.0  # cap on the corpus size in MiB (null: no cap)
    val_fraction: float = 0.05  # in (0, 0.5]


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto | gloo | nccl
    dp: int | None = None  # None = world_size // (tp * pp)
    tp: int | None = None  # None = chosen from the world size by the trainer
    pp: int = 1
    zero_stage: int = 0  # 0 | 1 | 2 | 3
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | zb1p
    num_microbatches: int | None = None
    virtual_stages: int = 1
    pp_layers: list[int] | None = None  # layers per (virtual) stage; None = balanced split
    offload_optimizer: bool = False
    recompute: str = "none"  # none | full | selective (true/false: full/none)
    bucket_cap_mb: float = 25.0
    timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0  # collective timeout until the first step is done


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit
    lr: float = 3e-3
    min_lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant | wsd (see train/schedules.py)
    decay_fraction: float = 0.2  # wsd: the last fraction of train.steps that decays to min_lr


@dataclass
class TrainConfig:
    global_batch_size: int = 16
    micro_batch_size: int | None = None  # None = global_batch_size // dp (no accumulation)
    steps: int = 200
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float = 1.0  # 0 disables
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 50  # 0 disables periodic eval (a final eval still runs)
    eval_batches: int = 8  # validation size, in global batches of windows (layout-independent)
    save_every: int = 0
    out_dir: str = "runs/default"
    resume: str = "never"  # never | auto | a path
    keep_last: int = 3  # checkpoints kept (>= 2)
    on_nonfinite: str = "raise"  # raise | skip: a NaN/inf loss or gradient norm
    sample_tokens: int = 48  # tokens generated at the end (0 disables)
    sample_prompt: str = "def "
    curriculum_start_seq_len: int | None = None  # sequence-length warm-up from this length (null: off)
    curriculum_steps: int = 0  # steps over which the length grows to data.seq_len
    curriculum_constant_tokens: bool = True  # more, shorter sequences early (else fewer tokens early)
    max_loss: float | None = None  # stop when a logged train loss is NaN/inf or above this (null: never)
    mem_warn_fraction: float = 0.9  # warn when memory in use exceeds this fraction of the device's
    compile: bool = False  # torch.compile each decoder layer's forward
    compile_backend: str = "inductor"  # torch.compile backend ("eager" checks tracing only)
    peak_tflops: float | None = None  # per-device peak for MFU (null: from the GPU's preset, if known)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "q_b_proj", "kv_b_proj", "o_proj"])
    quantize_base: str | None = None  # None | "nf4"


@dataclass
class Config:
    """A whole run. `model` holds only the keys the user set (MLAConfig fields and `pretrained`)."""

    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


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

Rule = tuple[Callable[[Any], bool], str]


def _one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def _at_least(low: int) -> Rule:
    return (lambda v: v >= low), f"a value >= {low}"


_POSITIVE: Rule = (lambda v: v > 0), "a value > 0"

# Checked on user-set values that are not null (the defaults already satisfy them).
RULES: dict[str, Rule] = {
    "data.vocab_size": _at_least(1),
    "data.seq_len": _at_least(1),
    "data.max_corpus_mb": _POSITIVE,
    "data.val_fraction": ((lambda v: 0 < v <= 0.5), "a value in (0, 0.5]"),
    "distributed.backend": _one_of("auto", "gloo", "nccl"),
    "distributed.dp": _at_least(1),
    "distributed.tp": _at_least(1),
    "distributed.pp": _at_least(1),
    "distributed.zero_stage": _one_of(0, 1, 2, 3),
    "distributed.pp_schedule": _one_of("gpipe", "1f1b", "interleaved_1f1b", "zb1p"),
    "distributed.num_microbatches": _at_least(1),
    "distributed.virtual_stages": _at_least(1),
    "distributed.pp_layers": ((lambda v: all(x >= 1 for x in v)), "a list of positive layer counts"),
    "distributed.bucket_cap_mb": _POSITIVE,
    "distributed.timeout_s": _POSITIVE,
    "distributed.startup_timeout_s": _POSITIVE,
    "distributed.recompute": _one_of("none", "full", "selective"),
    "optim.name": _one_of("adamw", "adamw8bit"),
    "optim.lr": _POSITIVE,
    "optim.min_lr": _at_least(0),
    "optim.betas": ((lambda v: all(0 <= b < 1 for b in v)), "two numbers in [0, 1)"),
    "optim.eps": _POSITIVE,
    "optim.weight_decay": _at_least(0),
    "optim.warmup_steps": _at_least(0),
    "optim.schedule": _one_of("cosine", "linear", "constant", "wsd"),
    "optim.decay_fraction": ((lambda v: 0 <= v <= 1), "a value in [0, 1]"),
    "train.global_batch_size": _at_least(1),
    "train.micro_batch_size": _at_least(1),
    "train.steps": _at_least(1),
    "train.precision": _one_of("fp32", "bf16", "fp16"),
    "train.grad_clip": _at_least(0),
    "train.log_every": _at_least(1),
    "train.eval_every": _at_least(0),
    "train.eval_batches": _at_least(1),
    "train.save_every": _at_least(0),
    "train.keep_last": _at_least(2),
    "train.on_nonfinite": _one_of("raise", "skip"),
    "train.sample_tokens": _at_least(0),
    "train.curriculum_start_seq_len": _at_least(1),
    "train.curriculum_steps": _at_least(0),
    "train.max_loss": _POSITIVE,
    "train.mem_warn_fraction": ((lambda v: 0 < v <= 1), "a value in (0, 1]"),
    "train.compile_backend": _one_of("inductor", "eager", "aot_eager"),
    "train.peak_tflops": _POSITIVE,
    "lora.r": _at_least(1),
    "lora.alpha": _POSITIVE,
    "lora.dropout": ((lambda v: 0 <= v < 1), "a value in [0, 1)"),
    "lora.targets": (bool, "at least one module name"),
    "lora.quantize_base": _one_of("nf4"),
}


# Keys that used to be booleans: true/false still accepted, as these values.
BOOL_ALIASES: dict[str, dict[bool, str]] = {
    "distributed.recompute": {True: "full", False: "none"},
}

# Old key names that still work: section -> {old key: new key}. Each says so once per process.
DEPRECATED_KEYS: dict[str, dict[str, str]] = {
    "distributed": {"activation_checkpointing": "recompute"},
}
_warned_deprecated: set[str] = set()


def _rename_deprecated(name: str, raw: dict) -> dict:
    """`raw` with deprecated keys renamed to their new names (warning once; both given is an error)."""
    renamed = dict(raw)
    for old, new in DEPRECATED_KEYS.get(name, {}).items():
        if old not in renamed:
            continue
        if new in renamed:
            raise ConfigError(f"{name}.{old}: deprecated alias of {name}.{new}; give only {name}.{new}")
        if old not in _warned_deprecated:
            _warned_deprecated.add(old)
            warnings.warn(f"{name}.{old} is deprecated: use {name}.{new}", FutureWarning, stacklevel=2)
        renamed[new] = renamed.pop(old)
    return renamed


# YAML 1.2 floats: unlike PyYAML's YAML 1.1 resolver, the dot is optional (`1e-8`, `3e-4`).
_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


for _cls in (_Loader, _Dumper):  # the dumper must quote strings that the loader would read as floats
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _unknown(kind: str, prefix: str, name: Any, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    listing = ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown {kind} {prefix + str(name)!r}{hint}; valid {kind}s: {listing}")


_INVALID = object()


def _convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int -> float, list -> tuple, "a,b" -> ["a", "b"]), or `_INVALID`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _INVALID
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner)
    if hint is Any:
        return value
    if value is None or (isinstance(value, bool) and hint is not bool):
        return _INVALID
    if hint in (bool, int, str):
        return value if isinstance(value, hint) else _INVALID
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else _INVALID
    if origin is dict:
        return _plain(value) if isinstance(value, dict) else _INVALID
    if origin in (tuple, list):
        if origin is list and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            return _INVALID
        item_hints = args if origin is tuple else args * len(value)
        if len(item_hints) != len(value):
            return _INVALID
        items = [_convert(v, h) for v, h in zip(value, item_hints, strict=True)]
        if any(item is _INVALID for item in items):
            return _INVALID
        return origin(items)
    raise TypeError(f"unsupported annotation {hint!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_describe(inner)} or null"
    plural = {int: "integers", float: "numbers", str: "strings"}
    if origin is tuple:
        return f"a list of {len(args)} {plural[args[0]]}"
    if origin is list:
        return f"a list of {plural[args[0]]} (or one comma-separated string)"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "any value"
    )


def _check_section(name: str, raw: Any, hints: dict[str, Any]) -> dict[str, Any]:
    """The typed, range-checked values of one section (only the keys present in `raw`)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}={raw!r}: expected a mapping of keys")
    values = {}
    for key, value in _rename_deprecated(name, raw).items():
        if key not in hints:
            raise _unknown("key", f"{name}.", key, list(hints))
        dotted = f"{name}.{key}"
        if isinstance(value, bool) and dotted in BOOL_ALIASES:
            value = BOOL_ALIASES[dotted][value]
        typed = _convert(value, hints[key])
        if typed is _INVALID:
            raise ConfigError(f"{dotted}={value!r}: expected {_describe(hints[key])}")
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
        message = _one_line(err)
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
            raise _unknown("section", "", name, SECTION_NAMES)
    sections = {
        name: cls(**_check_section(name, raw.get(name), typing.get_type_hints(cls)))
        for name, cls in SECTIONS.items()
    }
    cfg = Config(model=_check_model(raw.get("model")), **sections)
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(
            f"optim.min_lr={cfg.optim.min_lr!r}: expected a value <= optim.lr ({cfg.optim.lr!r})"
        )
    micro, batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if micro is not None and micro > batch:
        raise ConfigError(
            f"train.micro_batch_size={micro!r}: expected a value <= train.global_batch_size ({batch})"
        )
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
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}': invalid YAML ({_one_line(err)})") from None
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
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({_one_line(err)})") from None
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


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """`cfg` as nested dicts of plain YAML types (tuples become lists); `config_from_dict` inverts it."""
    return _plain(asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False))
