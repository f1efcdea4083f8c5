"""Text files: glob patterns -> checked file lists -> normalised text.

Every reader of corpus text goes through `read_text` (or, for documents that
come from JSON Lines or Parquet, `normalise`), so the tokenizer trainer, the
token cache and ``data prepare`` see the same characters: strict UTF-8, a
leading BOM stripped, CRLF line endings turned into LF.

The text-file path (`resolve_files`: data.train_files, data.eval_files,
``tokenizer --files``) reads every file as one plain-text document, so it
refuses files whose name says they are not plain text (JSON Lines, JSON,
Parquet, ArrayRecord, compressed): trained on as text, a ``.jsonl`` shard
would teach the model its keys, quotes and escapes.  ``python -m nl_jax data
prepare`` reads those formats (`match_files` finds its inputs).
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


# File name endings that mark a file as something other than one plain-text
# document, and what it is (for the refusal in `resolve_files`).
NOT_PLAIN_TEXT = {".jsonl": "a JSON Lines file", ".ndjson": "a JSON Lines file",
                  ".json": "a JSON file", ".parquet": "a Parquet file",
                  ".array_record": "an ArrayRecord file", ".gz": "a gzip-compressed file",
                  ".zst": "a zstd-compressed file", ".zstd": "a zstd-compressed file",
                  ".bz2": "a bzip2-compressed file", ".xz": "an xz-compressed file"}


def not_plain_text(path: str) -> str | None:
    """What the file's name says it is when that is not plain text (see
    `NOT_PLAIN_TEXT`), else None."""
    name = os.path.basename(path).lower()
    for suffix, what in NOT_PLAIN_TEXT.items():
        if name.endswith(suffix):
            return what
    return None


def resolve_files(patterns: str | Sequence[str], base_dir: str, *, key: str) -> list[str]:
    """Absolute paths of the plain-text files the glob patterns match, in a stable order.

    As `match_files`, and a file whose name marks it as JSON Lines, JSON,
    Parquet, ArrayRecord or compressed (`NOT_PLAIN_TEXT`) is refused with a
    `DataError` that names it and the ``data prepare`` command that reads it.
    """
    files = match_files(patterns, base_dir, key=key)
    for path in files:
        what = not_plain_text(path)
        if what is None:
            continue
        fmt = ("jsonl" if "JSON" in what else "parquet" if "Parquet" in what else
               "txt" if "compressed" in what else None)
        if fmt is None:
            fix = "remove it from the list"
        else:
            fix = (f"prepare it once with `python -m nl_jax data prepare --config FILE "
                   f"--input {path} --format {fmt} --out DIR` and train with "
                   f"--config.data.prepared=DIR")
        raise DataError(f"{key}: {path} is {what}, not a plain-text document, and would be "
                        f"trained on as raw text; {fix}")
    return files


def match_files(patterns: str | Sequence[str], base_dir: str, *, key: str) -> list[str]:
    """Absolute paths of the files the glob patterns match, in a stable order.

    Relative patterns are taken from `base_dir`.  Each pattern's matches are
    sorted; a file matched twice is kept once, at its first place.  `key` is
    the config key (or flag) the patterns came from, for error messages.
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
        text = normalise(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte offset {e.start}: {e.reason}); "
            f"convert it to UTF-8, e.g. iconv -f LATIN1 -t UTF-8") from e
    if not text.strip():
        what = "is empty (0 bytes)" if not raw else "holds only whitespace"
        raise DataError(f"{path} {what}; remove it from the file list or give it text")
    return text, hashlib.sha256(raw).hexdigest()


def normalise(text: str) -> str:
    """`text` with a leading BOM stripped and CRLF line endings turned into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n")
