"""Which modules `lora.targets` selects, by PEFT's rule, and how adapter_config.json states it.

A string is a regular expression over the whole module name; a list selects the names equal to an entry
or ending in `.entry`, where `*` in an entry stands for exactly one name component, so that
`experts.*.gate_proj` selects every routed expert's gate projection and nothing else (not
`shared_experts.gate_proj`, not a dense `mlp.gate_proj`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def target_matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list matches names equal or ending in .t,
    where `*` in t stands for one name component (`experts.*.gate_proj`: every routed expert's)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(re.fullmatch(_suffix_pattern(t), name) is not None for t in targets)


def _suffix_pattern(target: str) -> str:
    """The regex of names equal to or ending in `.target`, `*` matching one component."""
    body = r"[^.]+".join(re.escape(part) for part in target.split("*"))
    return rf"(?:.*\.)?{body}"


def peft_target_modules(targets: Sequence[str] | str) -> list[str] | str:
    """`target_modules` for adapter_config.json: the list as given, or one equivalent regex when a target
    holds `*` (PEFT does not expand it in a list)."""
    if isinstance(targets, str):
        return targets
    if not any("*" in t for t in targets):
        return sorted(targets)
    return "|".join(f"(?:{_suffix_pattern(t)})" for t in sorted(targets))
