"""The value rules of the run configuration, and the typing and YAML rules its values are read with.

`RULES` maps a dotted key to (check, what is expected); `convert` turns a YAML value into the type of a
dataclass annotation (or `INVALID`) and `describe` says that type in words for error messages. YAML is
read as YAML 1.2 reads numbers: `1e-8` is a float (PyYAML's YAML 1.1 rules make it a string).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config file, override, key or value; the message is one line naming the dotted key."""


Rule = tuple[Callable[[Any], bool], str]


def _one_of(*choices: Any) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(map(str, choices))


def _at_least(low: int) -> Rule:
    return (lambda v: v >= low), f"a value >= {low}"


_POSITIVE: Rule = (lambda v: v > 0), "a value > 0"
_SECONDS: Rule = (lambda v: 0 < v < 1e7), "a number of seconds > 0 and finite (< 1e7)"


def _mixture_entry(entry: dict) -> bool:
    weight = entry.get("weight", 1.0)
    return (
        set(entry) <= {"corpus", "format", "weight"}
        and isinstance(entry.get("corpus"), str)
        and entry.get("format", "auto") in ("auto", "text", "jsonl", "chat", "instruction")
        and isinstance(weight, (int, float))
        and not isinstance(weight, bool)
        and weight > 0
    )


# Checked on user-set values that are not null (the defaults already satisfy them).
RULES: dict[str, Rule] = {
    "data.vocab_size": _at_least(1),
    "data.seq_len": _at_least(1),
    "data.max_corpus_mb": _POSITIVE,
    "data.val_fraction": ((lambda v: 0 < v <= 0.5), "a value in (0, 0.5]"),
    "data.format": _one_of("auto", "text", "jsonl", "chat", "instruction"),
    "data.on_bad_record": _one_of("error", "skip"),
    "data.num_workers": _at_least(0),
    "data.mixture": (
        (lambda v: len(v) > 0 and all(_mixture_entry(e) for e in v)),
        "a non-empty list of {corpus: path, format: optional, weight: number > 0}",
    ),
    "data.encoding_errors": _one_of("strict", "replace"),
    "distributed.backend": _one_of("auto", "gloo", "nccl"),
    "distributed.dp": _at_least(1),
    "distributed.tp": _at_least(1),
    "distributed.pp": _at_least(1),
    "distributed.cp": _at_least(1),
    "distributed.ep": _at_least(1),
    "distributed.zero_stage": _one_of(0, 1, 2, 3),
    "distributed.pp_schedule": _one_of("gpipe", "1f1b", "interleaved_1f1b", "zb1p"),
    "distributed.num_microbatches": _at_least(1),
    "distributed.virtual_stages": _at_least(1),
    "distributed.pp_layers": ((lambda v: all(x >= 1 for x in v)), "a list of positive layer counts"),
    "distributed.bucket_cap_mb": _POSITIVE,
    "distributed.timeout_s": _SECONDS,
    "distributed.startup_timeout_s": _SECONDS,
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
    "train.max_skipped_steps": _at_least(0),
    "train.sample_tokens": _at_least(0),
    "train.curriculum_start_seq_len": _at_least(1),
    "train.curriculum_steps": _at_least(0),
    "train.max_loss": _POSITIVE,
    "train.mem_warn_fraction": ((lambda v: 0 < v <= 1), "a value in (0, 1]"),
    "train.compile_backend": _one_of("inductor", "eager", "aot_eager"),
    "train.peak_tflops": _POSITIVE,
    "train.wandb": (
        lambda v: (
            set(v) <= {"project", "name", "entity", "mode"}
            and all(isinstance(x, str) for x in v.values())
            and v.get("mode", "online") in ("online", "offline", "disabled")
        ),
        "a mapping of project, name, entity, mode (online, offline or disabled)",
    ),
    "train.profile_steps": (
        lambda v: len(v) == 2 and 1 <= v[0] <= v[1],
        "[first, last] steps with 1 <= first <= last",
    ),
    "lora.r": _at_least(1),
    "lora.alpha": _POSITIVE,
    "lora.dropout": ((lambda v: 0 <= v < 1), "a value in [0, 1)"),
    "lora.targets": (bool, "at least one module name"),
    "lora.quantize_base": _one_of("nf4"),
}


def broken_relation(cfg: Any) -> str | None:
    """What is wrong between two keys of a `Config` (each fine alone), or None."""
    if cfg.optim.min_lr > cfg.optim.lr:
        return f"optim.min_lr={cfg.optim.min_lr!r}: expected a value <= optim.lr ({cfg.optim.lr!r})"
    timeout, startup = cfg.distributed.timeout_s, cfg.distributed.startup_timeout_s
    if startup < timeout:
        return (
            f"distributed.startup_timeout_s={startup!r}: expected a value >= distributed.timeout_s "
            f"({timeout!r}), since it bounds the first step too"
        )
    micro, batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if micro is not None and micro > batch:
        return f"train.micro_batch_size={micro!r}: expected a value <= train.global_batch_size ({batch})"
    return None


# Keys that used to be booleans: true/false still accepted, as these values.
BOOL_ALIASES: dict[str, dict[bool, str]] = {
    "distributed.recompute": {True: "full", False: "none"},
}

# Old key names that still work: section -> {old key: new key}. Each says so once per process.
DEPRECATED_KEYS: dict[str, dict[str, str]] = {
    "distributed": {"activation_checkpointing": "recompute"},
}


# YAML 1.2 floats: unlike PyYAML's YAML 1.1 resolver, the dot is optional (`1e-8`, `3e-4`).
_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


class YamlLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        """A mapping; a key given twice (a section or a key repeated) is an error, not a silent override."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class YamlDumper(yaml.SafeDumper):
    pass


for _cls in (YamlLoader, YamlDumper):  # the dumper must quote strings that the loader would read as floats
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


INVALID = object()


def plain(value: Any) -> Any:
    """`value` with tuples turned into lists, recursively (plain YAML types)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def convert(value: Any, hint: Any) -> Any:
    """`value` as type `hint` (int -> float, list -> tuple, "a,b" -> ["a", "b"]), or `INVALID`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None if type(None) in args else INVALID
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner)
    if hint is Any:
        return value
    if value is None or (isinstance(value, bool) and hint is not bool):
        return INVALID
    if hint in (bool, int, str):
        return value if isinstance(value, hint) else INVALID
    if hint is float:
        return float(value) if isinstance(value, (int, float)) else INVALID
    if origin is dict:
        return plain(value) if isinstance(value, dict) else INVALID
    if origin in (tuple, list):
        if origin is list and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            return INVALID
        item_hints = args if origin is tuple else args * len(value)
        if len(item_hints) != len(value):
            return INVALID
        items = [convert(v, h) for v, h in zip(value, item_hints, strict=True)]
        if any(item is INVALID for item in items):
            return INVALID
        return origin(items)
    raise TypeError(f"unsupported annotation {hint!r}")


def describe(hint: Any) -> str:
    """The type `hint` in words, as error messages say what was expected."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return f"{describe(inner)} or null"
    plural = {int: "integers", float: "numbers", str: "strings", dict[str, Any]: "mappings"}
    if origin is tuple:
        return f"a list of {len(args)} {plural[args[0]]}"
    if origin is list:
        return f"a list of {plural[args[0]]} (or one comma-separated string)"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "any value"
    )


_warned_deprecated: set[str] = set()


def rename_deprecated(name: str, raw: dict) -> dict:
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


def one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def unknown_name(kind: str, prefix: str, name: Any, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    listing = ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown {kind} {prefix + str(name)!r}{hint}; valid {kind}s: {listing}")
