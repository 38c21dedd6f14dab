"""Record formats: how the files of a corpus become documents, and which of their tokens are trained on.

A document is a list of segments ``(text, trained)``; ``trained`` is False for the parts the loss must
ignore (an instruction's prompt, a chat's system and user turns and the role headers).

- ``text``: each file is one document, all trained (the built-in and plain-text corpora).
- ``jsonl``: one JSON object per line; the document is the string in ``text_field``.
- ``instruction``: one JSON object per line with ``prompt_field`` and ``completion_field`` strings;
  the loss counts only the completion.
- ``chat``: one JSON object per line with ``messages: [{role, content}, ...]`` rendered by a chat
  template; the loss counts only the assistant turns.
- ``auto``: ``.jsonl`` / ``.json`` files are ``jsonl``, anything else ``text``.

A malformed line (invalid JSON, not an object, a missing field, a field of the wrong type, an empty
line or field, a chat without an assistant turn) raises ``BadRecord`` naming the file and the line, or,
with ``on_bad_record="skip"``, is skipped and counted in ``RecordStats``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from train.data.sources import read_text

FORMATS = ("auto", "text", "jsonl", "chat", "instruction")
RECORD_FORMATS = ("jsonl", "chat", "instruction")
ON_BAD_RECORD = ("error", "skip")
Segment = tuple[str, bool]


class BadRecord(ValueError):
    """A malformed record: the message names the file, the line and what was expected; ``kind`` is one
    of ``empty``, ``json``, ``not_object``, ``missing_field``, ``wrong_type``, ``no_assistant``."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FormatSpec:
    """How to read records: the format and the field names (see the module docstring)."""

    format: str = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    on_bad_record: str = "error"


@dataclass
class RecordStats:
    """Documents read and malformed records skipped (by kind of problem)."""

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


def resolve_format(path: Path, fmt: str) -> str:
    """The format of ``path``: ``fmt`` itself, or by extension for ``auto``."""
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    return "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"


def _string(record: dict, key: str, kind: str) -> str:
    if key not in record:
        raise BadRecord(f"missing field {key!r} ({kind})", "missing_field")
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is {type(value).__name__}, expected a string ({kind})", "wrong_type")
    if not value.strip():
        raise BadRecord(f"field {key!r} is empty ({kind})", "empty")
    return value


def _messages(record: dict) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        raise BadRecord("missing field 'messages' (chat)", "missing_field")
    if not isinstance(messages, list) or not messages:
        raise BadRecord(
            "field 'messages' must be a non-empty list of {role, content} objects (chat)", "wrong_type"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(
                f"messages[{i}] is {type(message).__name__}, expected an object (chat)", "wrong_type"
            )
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRecord(f"messages[{i}].{key} is missing or not a string (chat)", "wrong_type")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant message: nothing to train on (chat)", "no_assistant")
    return messages


def record_segments(line: str, fmt: str, spec: FormatSpec, template) -> list[Segment]:
    """The segments of one JSONL line in format ``fmt`` (``BadRecord`` without the file and line)."""
    if not line.strip():
        raise BadRecord("empty line", "empty")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(f"invalid JSON ({e.msg} at column {e.colno})", "json") from None
    if not isinstance(record, dict):
        raise BadRecord(f"expected a JSON object, got {type(record).__name__}", "not_object")
    if fmt == "jsonl":
        return [(_string(record, spec.text_field, "data.text_field"), True)]
    if fmt == "instruction":
        prompt = _string(record, spec.prompt_field, "instruction prompt")
        completion = _string(record, spec.completion_field, "instruction completion")
        return [(prompt, False), (completion, True)]
    return template.segments(_messages(record))


def read_documents(
    path: Path, fmt: str, spec: FormatSpec, template, stats: RecordStats
) -> Iterator[tuple[int, list[Segment]]]:
    """``(line number, segments)`` of each document of ``path`` (line 0 for a whole-file text document).

    Streams the file line by line; malformed lines raise or are skipped per ``spec.on_bad_record``."""
    if fmt == "text":
        stats.documents += 1
        yield 0, [(read_text(path), True)]
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            try:
                segments = record_segments(line, fmt, spec, template)
            except BadRecord as e:
                if spec.on_bad_record != "skip":
                    message = f"data: {path}:{number}: {e} (data.on_bad_record=skip skips it)"
                    raise BadRecord(message, e.kind) from None
                stats.skipped[e.kind] = stats.skipped.get(e.kind, 0) + 1
                continue
            stats.documents += 1
            yield number, segments
