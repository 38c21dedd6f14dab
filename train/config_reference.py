"""The configuration reference, generated from the config dataclasses' field docstrings.

    python -m train.config_reference            # print the full reference (one table per section)
    python -m train.config_reference --summary  # print the README's short list of keys
    python -m train.config_reference --write    # rewrite both, between their markers, in place
    python -m train.config_reference --check    # exit 1 if README.md or docs/configuration.md is stale

A key's description is the string literal on the line after its field (the attribute-docstring
convention) in `train/config_sections.py`. The `model` section's keys are `MLAConfig`'s fields, which
`models/config.py` does not document; their descriptions live in `MODEL_KEYS` below (a field docstring in
`MLAConfig`, if one is ever written, takes precedence). Deprecated aliases get a row of their own.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

import models.config
from models.config import MLAConfig
from train.config import MODEL_EXTRA_KEYS, SECTIONS
from train.config_rules import DEPRECATED_KEYS

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = "python -m train.config_reference --write"
FULL_MARKER, SUMMARY_MARKER = "config-reference", "config-summary"

# model key -> (default as shown, when not MLAConfig's own; description)
MODEL_KEYS: dict[str, tuple[str | None, str]] = {
    "vocab_size": ("tokenizer size", "Vocabulary size, in tokens; must cover every token id in the data."),
    "hidden_size": (None, "Model width (residual stream size)."),
    "num_layers": (None, "Decoder layers."),
    "num_heads": (None, "Attention heads; must be divisible by `distributed.tp`."),
    "q_lora_rank": (None, "Query compression rank (null: a direct `q_proj`, as DeepSeek-V2-Lite)."),
    "kv_lora_rank": (None, "Rank of the compressed key/value latent `c_kv`."),
    "qk_nope_head_dim": (None, "Per-head query/key dimensions without position."),
    "qk_rope_head_dim": (None, "Per-head rotary dimensions (one RoPE key shared by all heads)."),
    "v_head_dim": (None, "Per-head value dimension."),
    "intermediate_size": (None, "SwiGLU MLP width; divisible by `distributed.tp`."),
    "max_seq_len": (None, "Longest sequence, in tokens (RoPE table size)."),
    "rope_theta": (None, "RoPE base."),
    "rope_scaling": (
        None,
        "null, or YaRN: `{type: yarn, factor, original_max_position_embeddings, beta_fast, beta_slow, "
        "mscale, mscale_all_dim}`.",
    ),
    "rms_norm_eps": (None, "RMSNorm epsilon."),
    "tie_embeddings": (None, "Share the embedding with the LM head (not with pp > 1 or ZeRO-3)."),
    "dropout": (None, "Attention and residual dropout probability; in [0, 1)."),
    "init_std": (None, "Standard deviation of the normal initialisation."),
    "n_routed_experts": (
        None,
        "Routed experts per MoE layer (DeepSeekMoE); null or 0: every layer a dense MLP, as before.",
    ),
    "num_experts_per_tok": (None, "Routed experts chosen per token (top-k); required with experts."),
    "n_shared_experts": (None, "Always-on experts, fused into one MLP of n x `moe_intermediate_size`."),
    "moe_intermediate_size": (None, "Width of each expert's SwiGLU MLP; divisible by `distributed.tp`."),
    "first_k_dense_replace": (None, "The first k layers stay dense MLPs."),
    "moe_layer_freq": (None, "Layer i >= first_k_dense_replace is MoE when i % moe_layer_freq == 0."),
    "scoring_func": (None, "Router scores: `softmax` (DeepSeek-V2) or `sigmoid` (V3)."),
    "topk_method": (
        None,
        "`greedy`, `group_limited_greedy` (V2: best experts of the best `topk_group` groups) or `noaux_tc` "
        "(V3: groups scored by their best two, selection through `e_score_correction_bias`).",
    ),
    "n_group": (None, "Expert groups for group-limited routing (null: one group)."),
    "topk_group": (None, "Groups kept per token for group-limited routing."),
    "norm_topk_prob": (None, "Normalise the chosen experts' weights to sum 1 (before the scaling)."),
    "routed_scaling_factor": (None, "Factor applied to the routed experts' weights."),
    "aux_loss_alpha": (
        None,
        "Weight of the sequence-level balance loss added to the training loss (0: none; pp = 1 only). "
        "Not read from a pretrained folder.",
    ),
    "router_bias_update_rate": (
        None,
        "V3 aux-loss-free balancing: after each step the correction bias moves by this rate towards "
        "the under-loaded experts (0: frozen; `noaux_tc` only). Not read from a pretrained folder.",
    ),
    "pretrained": (
        None,
        "A Hugging Face DeepSeek-V2/V3 folder to start from; its `config.json` defines the model (any "
        "`model.*` key also given must agree with it).",
    ),
}


def field_docstrings(cls: type) -> dict[str, str]:
    """`{field: docstring}` for the fields of dataclass `cls` followed by a string literal, whitespace
    collapsed to single spaces."""
    tree = ast.parse(inspect.getsource(inspect.getmodule(cls)))
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    docs = {}
    for stmt, after in zip(node.body, node.body[1:], strict=False):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            if isinstance(after.value.value, str):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def format_default(value: Any) -> str:
    """A default as YAML would spell it, in backticks."""
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(format_default(v).strip("`") for v in value) + "]`"
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str) and value != value.strip():
        text = repr(value).replace("'", '"')
    else:
        text = str(value).replace("e-0", "e-")
    return f"`{text}`"


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _rows_of(section: str, cls: type) -> list[tuple[str, str, str]]:
    docs = field_docstrings(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name not in docs:
            raise ValueError(
                f"{section}.{f.name} has no field docstring: add a string literal on the line after the "
                f"field in {inspect.getsourcefile(cls)}"
            )
        rows.append((f"{section}.{f.name}", format_default(_default(f)), docs[f.name]))
    for old, new in DEPRECATED_KEYS.get(section, {}).items():
        rows.append(
            (f"{section}.{old}", "", f"Deprecated alias of `{section}.{new}`; still accepted (warns).")
        )
    return rows


def _model_rows() -> list[tuple[str, str, str]]:
    own = field_docstrings(MLAConfig)
    fields = {f.name: format_default(_default(f)) for f in dataclasses.fields(MLAConfig)}
    fields.update({key: "`null`" for key in MODEL_EXTRA_KEYS})
    rows = []
    for key, default in fields.items():
        shown, description = MODEL_KEYS.get(key, (None, own.get(key)))
        description = own.get(key, description)
        if description is None:
            raise ValueError(
                f"model.{key} is undocumented: add it to MODEL_KEYS in train/config_reference.py "
                f"(or a field docstring in {models.config.__file__})"
            )
        rows.append((f"model.{key}", default if shown is None else shown, description))
    return rows


def all_rows() -> dict[str, list[tuple[str, str, str]]]:
    """`{section: [(dotted key, default, description)]}`, sections in config-file order."""
    return {"model": _model_rows(), **{name: _rows_of(name, cls) for name, cls in SECTIONS.items()}}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def full_reference() -> str:
    """One Markdown table per section: key, default, description."""
    parts = []
    for section, rows in all_rows().items():
        lines = [f"### `{section}`", "", "| key | default | description |", "|---|---|---|"]
        lines += [f"| `{key}` | {_cell(default)} | {_cell(doc)} |" for key, default, doc in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def summary() -> str:
    """One row per section listing its keys, each linked to the full reference."""
    lines = ["| section | keys |", "|---|---|"]
    for section, rows in all_rows().items():
        keys = ", ".join(f"`{key.split('.', 1)[1]}`" for key, _, _ in rows)
        lines.append(f"| [`{section}`](docs/configuration.md#{section}) | {keys} |")
    return "\n".join(lines) + "\n"


# file (relative to the repository root) -> (marker name, generator)
GENERATED: dict[str, tuple[str, Any]] = {
    "README.md": (SUMMARY_MARKER, summary),
    "docs/configuration.md": (FULL_MARKER, full_reference),
}


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"


def replace_block(text: str, name: str, body: str) -> str:
    """`text` with the part between the `name` markers replaced by `body`."""
    start, end = _markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {start.strip()} and one {end} marker")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}{body}{end}{tail}"


def stale_files(root: Path = ROOT) -> list[str]:
    """The generated files whose marked block differs from the generator's output."""
    stale = []
    for rel, (name, generate) in GENERATED.items():
        text = (root / rel).read_text()
        if replace_block(text, name, generate()) != text:
            stale.append(rel)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", action="store_true", help="print the README's short list of keys")
    parser.add_argument("--write", action="store_true", help="rewrite the marked blocks in place")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    args = parser.parse_args(argv)
    if args.write:
        for rel, (name, generate) in GENERATED.items():
            path = ROOT / rel
            path.write_text(replace_block(path.read_text(), name, generate()))
        return 0
    if args.check:
        stale = stale_files()
        for rel in stale:
            print(f"{rel}: the configuration reference is stale; run {REGENERATE}", file=sys.stderr)
        return 1 if stale else 0
    print(summary() if args.summary else full_reference(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
