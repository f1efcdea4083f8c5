"""Text files: glob patterns -> checked file lists -> normalised text.

Every reader of corpus text goes through `read_text`, so the tokenizer trainer
and the token cache see the same characters: strict UTF-8, a leading BOM
stripped, CRLF line endings turned into LF.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence

from nl_jax.errors import DataError


def as_patterns(patterns: str | Sequence[str]) -> tuple[str, ...]:
    """A single pattern string or a sequence of them, as a tuple."""
    if isinstance(patterns, str):
        return (patterns,)
    return tuple(str(p) for p in patterns)


def resolve_files(patterns: str | Sequence[str], base_dir: str, *, key: str) -> list[str]:
    """Absolute paths of the files the glob patterns match, in a stable order.

    Relative patterns are taken from `base_dir`.  Each pattern's matches are
    sorted; a file matched twice is kept once, at its first place.  `key` is
    the config key the patterns came from, for error messages.
    """
    patterns = as_patterns(patterns)
    if not patterns:
        raise DataError(f"{key} is empty; give at least one file or glob pattern")
    files: list[str] = []
    seen: set[str] = set()
    for pattern in patterns:
        full = os.path.expanduser(pattern)
        if not os.path.isabs(full):
            full = os.path.join(base_dir, full)
        matches = sorted(p for p in glob.glob(full, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(
                f"{key}: pattern {pattern!r} matches no file (looked for {full}); "
                f"fix the path or pattern (relative paths start at {base_dir})")
        for path in matches:
            path = os.path.abspath(path)
            if path not in seen:
                seen.add(path)
                files.append(path)
    return files


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check that it exists "
                        f"and is readable") from e
    return digest.hexdigest()


def read_text(path: str) -> str:
    """The file's text: strict UTF-8, BOM stripped, CRLF -> LF; never empty."""
    return read_text_hashed(path)[0]


def read_text_hashed(path: str) -> tuple[str, str]:
    """``read_text(path)`` and the hex SHA-256 of the very bytes it decoded."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check that it exists "
                        f"and is readable") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); "
            f"convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8") from e
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.replace("\r\n", "\n")
    if not text.strip():
        what = "is empty (0 bytes)" if not raw else "holds only whitespace"
        raise DataError(f"{path} {what}; remove it from the file list or give it text")
    return text, hashlib.sha256(raw).hexdigest()
