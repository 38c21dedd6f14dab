"""Corpus discovery: which files of a corpus are documents, in which order.

``"stdlib"`` is the running Python's standard-library ``.py`` sources; anything else is a text file or a
folder of text files. The order is sorted relative paths, so the same corpus always gives the same
documents and, downstream, the same tokens.
"""

from __future__ import annotations

import math
import os
import sysconfig
from pathlib import Path

_SNIFF_BYTES = 8192
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__"}
MIB = 1 << 20


def _stdlib_sources(root: Path) -> list[Path]:
    """The standard library's ``.py`` files under ``root``, without tests and installed packages."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_STDLIB_DIRS and "test" not in d.lower()]
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _folder_files(root: Path) -> list[Path]:
    """Regular files under ``root``, recursively, sorted by relative path; hidden entries are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.relative_to(root).as_posix())


def _has_text(path: Path) -> bool:
    """True if the file has no NUL byte in its first 8 KiB (not a binary) and is not all whitespace."""
    with open(path, "rb") as f:
        chunk = f.read(_SNIFF_BYTES)
        if b"\0" in chunk:
            return False
        while chunk:
            if chunk.strip():
                return True
            chunk = f.read(MIB)
    return False


def read_text(path: Path, encoding_errors: str = "strict", max_bytes: int | None = None) -> str:
    """The file's bytes (its first `max_bytes`, when given: the corpus cap) as UTF-8. Undecodable bytes
    are a `ValueError` naming the file (`strict`) or U+FFFD (`replace`)."""
    with open(path, "rb") as f:
        data = f.read() if max_bytes is None else f.read(max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if max_bytes is not None and error.reason == "unexpected end of data":
            return data[: error.start].decode("utf-8", errors=encoding_errors)  # the cap cut a character
        if encoding_errors == "replace":
            return data.decode("utf-8", errors="replace")
        raise ValueError(
            f"data.corpus: {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); set data.encoding_errors=replace to read it with U+FFFD for such bytes"
        ) from None


def byte_limits(files: list[Path], max_corpus_mb: float | None) -> dict[Path, int]:
    """The files the corpus cap cuts short, with the bytes to read of each: the cap applies to the bytes
    read, so one huge file is read only up to it."""
    cap, total, limits = math.inf if max_corpus_mb is None else max_corpus_mb * MIB, 0, {}
    for path in files:
        size = path.stat().st_size
        if total + size > cap:
            limits[path] = max(1, int(cap - total))
        total += size
    return limits


def corpus_files(corpus: str, max_corpus_mb: float | None = None) -> list[Path]:
    """The documents of ``corpus`` in a deterministic order, capped at about ``max_corpus_mb`` MiB.

    ``"stdlib"`` is the running Python's standard-library ``.py`` sources (no tests, no installed
    packages); anything else is a text file or a folder of text files (recursive). Files are taken in
    sorted relative-path order until their total size reaches the cap; binaries (a NUL byte in the first
    8 KiB) and empty or whitespace-only files are skipped. Raises ``ValueError`` naming ``data.corpus``
    when nothing usable is found.
    """
    if max_corpus_mb is not None and not max_corpus_mb > 0:
        raise ValueError(f"data.max_corpus_mb={max_corpus_mb}: expected a positive number of MiB or None")
    if corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        candidates = _stdlib_sources(root)
        where = f"the Python standard library's .py sources under {root}"
    else:
        path = Path(corpus).resolve()
        if path.is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = _folder_files(path)
        else:
            raise ValueError(
                f"data.corpus={corpus!r}: no such file or folder (expected 'stdlib' or a path to text)"
            )
        where = str(path)
    cap = math.inf if max_corpus_mb is None else max_corpus_mb * MIB
    chosen, total = [], 0
    for p in candidates:
        if total >= cap:
            break
        if _has_text(p):
            chosen.append(p)
            total += p.stat().st_size
    if not chosen:
        raise ValueError(
            f"data.corpus={corpus!r}: no usable text in {where} ({len(candidates)} files; expected UTF-8 "
            "text, and binary, empty or whitespace-only files are skipped)"
        )
    return chosen
