"""Run configuration: typed sections read from YAML, checked at load, with dotted overrides.

A config file is a mapping of sections (`model`, `data`, `distributed`, `optim`, `train`, `lora`). Any key
can be overridden as `section.key=value`, the value read as YAML: `train.steps=10`,
`optim.betas=[0.9,0.99]`, `model.q_lora_rank=null`, `model.rope_scaling.factor=4` (nested keys only in
`model`). Values are checked against the dataclass annotations and the ranges in `train/config_rules.py`;
every mistake raises a one-line `ConfigError` that names the dotted key, the value and what was expected.
Each field's docstring is its entry in the configuration reference (`python -m train.config_reference`).

The `model` section keeps only the keys the user set (any `MLAConfig` field, plus `pretrained`); the
trainer merges them with the `MLAConfig` defaults and the tokenizer's vocabulary size.

YAML is read as YAML 1.2 reads numbers: `1e-8` is a float (PyYAML's YAML 1.1 rules make it a string).
"""

from __future__ import annotations

import difflib
import typing
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import MLAConfig
from train.config_rules import (
    BOOL_ALIASES,
    DEPRECATED_KEYS,
    INVALID,
    RULES,
    YamlDumper,
    YamlLoader,
    broken_relation,
    convert,
    describe,
    plain,
)
from train.schedules import check_curriculum


class ConfigError(ValueError):
    """A bad config file, override, key or value; the message is one line naming the dotted key."""


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """`stdlib` (the Python standard library's `.py` sources, found at run time) or a path to a text file
    or a folder of text files (recursive; binary, empty and hidden files skipped)."""
    tokenizer: str | None = None
    """A `tokenizer.json` with an `<|endoftext|>` token; null trains a byte-level BPE on the corpus and
    caches it."""
    vocab_size: int = 2048
    """Size of the trained tokenizer, in tokens (>= 257: 256 bytes + `<|endoftext|>`); unused with
    `data.tokenizer`."""
    seq_len: int = 128
    """Training sequence length, in tokens (>= 1); at most `model.max_seq_len`."""
    cache_dir: str = ".cache/mla-parallel"
    """Folder of the tokenizer and the memory-mapped token files (`train.bin`, `val.bin` + JSON sidecars);
    shared by every rank."""
    max_corpus_mb: float | None = 4.0
    """Cap on the bytes of the corpus read, in MiB (> 0; null: everything); the last file is cut short."""
    val_fraction: float = 0.05
    """Fraction of the documents held out for validation, spread over the corpus and never trained on;
    in (0, 0.5]. When those documents would hold less than half or more than twice this share of the
    bytes (few or uneven documents), the last `val_fraction` of the tokens instead; the log says which."""
    encoding_errors: str = "strict"
    """Corpus bytes that are not UTF-8: `strict` (an error naming the file) or `replace` (read as U+FFFD;
    the log counts the files)."""


@dataclass
class DistributedConfig:
    backend: str = "auto"
    """`auto` (nccl with CUDA, else gloo), `gloo` or `nccl`."""
    dp: int | None = None
    """Data-parallel size (>= 1; null: world size / (tp x pp))."""
    tp: int | None = None
    """Tensor-parallel size (>= 1; null: 1); must divide `model.num_heads` and `model.intermediate_size`."""
    pp: int = 1
    """Pipeline stages (>= 1)."""
    zero_stage: int = 0
    """0 (plain data parallel), 1 (optimizer state + fp32 master weights sharded over dp), 2 (+ gradients),
    3 (+ parameters)."""
    sequence_parallel: bool = False
    """Split norms, residuals and dropout along the sequence over the TP ranks (needs `data.seq_len`
    divisible by tp); see the memory guide."""
    pp_schedule: str = "1f1b"
    """`gpipe`, `1f1b`, `interleaved_1f1b` (needs `virtual_stages >= 2` and micro-batches a multiple of
    pp) or `zb1p` (ZB-H1 zero-bubble)."""
    num_microbatches: int | None = None
    """Micro-batches per step and dp rank (>= 1; null: from `train.micro_batch_size`)."""
    virtual_stages: int = 1
    """Model chunks per pipeline rank (>= 1; interleaved 1F1B)."""
    pp_layers: list[int] | None = None
    """Decoder layers per (virtual) stage, e.g. `[3, 5]` (each >= 1; null: a balanced split)."""
    offload_optimizer: bool = False
    """Keep fp32 master weights and optimizer state in (pinned) CPU memory and run the step on the CPU."""
    recompute: str = "none"
    """Activation recompute: `none`, `full` (recompute each decoder layer in backward) or `selective`
    (recompute only the attention core); `true`/`false` mean `full`/`none`. The old name
    `distributed.activation_checkpointing` is a deprecated alias that still works."""
    bucket_cap_mb: float = 25.0
    """Data-parallel gradient bucket size, in MiB (> 0)."""
    timeout_s: float = 600.0
    """Collective timeout once the first step is done, in seconds (> 0, finite): a lost rank fails the job
    instead of hanging it."""
    startup_timeout_s: float = 1800.0
    """Collective timeout until the first step is done (data building, loading), in seconds (>=
    `distributed.timeout_s`), honoured as given."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """`adamw`, or `adamw8bit` (`parallel.AdamW8bit`: the same hyper-parameters, moments in 8 bits)."""
    lr: float = 3e-3
    """Peak learning rate (> 0), reached at the end of warmup."""
    min_lr: float = 3e-4
    """Final learning rate of the decaying schedules (>= 0, <= `optim.lr`)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW's two moment decay rates, each in [0, 1)."""
    eps: float = 1e-8
    """AdamW's epsilon (> 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (>= 0); none on norms."""
    warmup_steps: int = 20
    """Steps of linear warmup to `optim.lr` (>= 0)."""
    schedule: str = "cosine"
    """Learning rate after warmup: `cosine`, `linear`, `constant` or `wsd` (warmup-stable-decay); see
    `train/schedules.py`."""
    decay_fraction: float = 0.2
    """`wsd`: the last fraction of `train.steps` that decays linearly to `optim.min_lr`; in [0, 1]."""


@dataclass
class TrainConfig:
    global_batch_size: int = 16
    """Sequences per optimizer step, whatever the layout (>= 1)."""
    micro_batch_size: int | None = None
    """Sequences per forward/backward on one rank (>= 1, <= `train.global_batch_size`; null: global / dp,
    no accumulation)."""
    steps: int = 200
    """Optimizer steps (>= 1)."""
    precision: str = "fp32"
    """`fp32`; `bf16`, `fp16`: 16-bit weights and activations, fp32 master weights and gradient
    accumulation in the optimizer; `fp16` adds dynamic loss scaling (`loss_scale`, `skipped_steps` in the
    metrics)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (>= 0; 0: off)."""
    seed: int = 1234
    """Seed of the weights and the data order (>= 0)."""
    log_every: int = 10
    """Steps between progress lines and `metrics.jsonl` records (>= 1)."""
    eval_every: int = 50
    """Steps between validations (>= 0; 0: only before and after training)."""
    eval_batches: int = 8
    """Validation size, in global batches of windows (>= 1; layout-independent)."""
    save_every: int = 0
    """Steps between checkpoints into `checkpoints/step-NNNNNNNN/` (>= 0; 0: only at the end and on
    SIGTERM)."""
    out_dir: str = "runs/default"
    """Folder the run writes its files into."""
    resume: str = "never"
    """`never`; `auto`: the newest complete, checksum-valid checkpoint of `out_dir` (none: start afresh);
    or a checkpoint folder or run folder. A fresh run (`never`) into a folder that holds a run is refused
    unless `train.overwrite` is set."""
    overwrite: bool = False
    """With `train.resume=never`, move the files of a run already in `out_dir` aside to
    `<out_dir>.replaced-<time>/` (never deleted) instead of refusing to start."""
    keep_last: int = 3
    """Checkpoints kept (>= 2)."""
    on_nonfinite: str = "raise"
    """A NaN/inf loss or gradient norm: `raise` (stop, naming the step) or `skip` (no update; counted)."""
    max_skipped_steps: int = 10
    """`on_nonfinite=skip`: the run stops with an error when more than this many steps in a row are
    skipped, or more than 5% of `train.steps` (and at least this many) in all (>= 0)."""
    sample_tokens: int = 48
    """Tokens of the sample generated at the end (>= 0; 0: none)."""
    sample_prompt: str = "def "
    """Prompt of the sample generated at the end."""
    curriculum_start_seq_len: int | None = None
    """Sequence-length warm-up: the first length, in tokens (>= 1; null: off); with constant tokens a
    divisor of `data.seq_len`."""
    curriculum_steps: int = 0
    """Steps over which the length grows to `data.seq_len` (>= 0; >= 1 when the curriculum is on)."""
    curriculum_constant_tokens: bool = True
    """B x L / L_k sequences of length L_k per step (false: B sequences, fewer tokens early)."""
    max_loss: float | None = None
    """Stop the run when a logged training loss is NaN/inf or above this (> 0; null: never); sweeps set
    it."""
    mem_warn_fraction: float = 0.9
    """Log a warning when memory in use (the device's on GPU, the host's on CPU) exceeds this fraction; in
    (0, 1]."""
    compile: bool = False
    """`torch.compile` each decoder layer's forward (hooks stay eager)."""
    compile_backend: str = "inductor"
    """torch.compile backend: `inductor`, or `eager`/`aot_eager` (check tracing only)."""
    peak_tflops: float | None = None
    """Per-device dense 16-bit peak for MFU, in TFLOP/s (> 0; null: the detected GPU preset's, no MFU on
    CPU)."""


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters only (every other weight frozen); writes `adapter/` (PEFT layout) and the merged
    model in `final/`."""
    r: int = 8
    """Adapter rank (>= 1)."""
    alpha: float = 16.0
    """Adapter scale numerator (> 0): the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input; in [0, 1)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "q_b_proj", "kv_b_proj", "o_proj"])
    """Linear layers to adapt, by PEFT's rule: a list matches module names equal to or ending in `.` + an
    entry; a single string is a regular expression over the whole name."""
    quantize_base: str | None = None
    """null, or `nf4`: the targeted weights become frozen 4-bit NormalFloat with double quantization
    (QLoRA), each rank quantizing its own TP shard."""


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


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _unknown(kind: str, prefix: str, name: Any, valid: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    listing = ", ".join(prefix + v for v in valid)
    return ConfigError(f"unknown {kind} {prefix + str(name)!r}{hint}; valid {kind}s: {listing}")


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
        value = yaml.load(text, Loader=YamlLoader)
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


def config_to_dict(cfg: Config) -> dict:
    """`cfg` as nested dicts of plain YAML types (tuples become lists); `config_from_dict` inverts it."""
    return plain(asdict(cfg))


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML that `load_config(path)` reads back to an equal `Config`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(config_to_dict(cfg), Dumper=YamlDumper, sort_keys=False))
