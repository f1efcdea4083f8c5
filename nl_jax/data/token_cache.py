"""Token cache: a file list + a tokenizer -> one 1-D token array on disk.

The files are read with `text_files.read_text`, tokenized one file (one
document) at a time, each followed by the tokenizer's eos id, and
concatenated.  The array is saved as ``tokens-<key>.npy`` (uint16 when the
vocabulary fits, else uint32) next to a ``.json`` describing it.  The key
hashes the tokenizer fingerprint and the SHA-256 of every file's bytes in
order, so an edited file or another tokenizer gives a new cache entry and an
unchanged corpus is never tokenized twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from nl_jax.data import text_files
from nl_jax.errors import DataError

CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """The tokens of a file list; `built` says whether this call tokenized them."""

    tokens: np.ndarray
    key: str
    path: str | None
    files: tuple[str, ...]
    built: bool


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(files: Sequence[str], tokenizer_fingerprint: str) -> str:
    """Hex key of (format, tokenizer, contents of the files in order)."""
    description = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint,
                   "files": [text_files.file_sha256(f) for f in files]}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def tokenize_files(files: Sequence[str], tokenizer) -> np.ndarray:
    """Concatenated tokens of the files, each followed by `tokenizer.eos_id`."""
    dtype = token_dtype(tokenizer.vocab_size)
    parts = []
    for path in files:
        ids = tokenizer.encode(text_files.read_text(path))
        ids.append(tokenizer.eos_id)
        parts.append(np.asarray(ids, dtype=np.int64))
    tokens = np.concatenate(parts)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise DataError(f"tokenizer {tokenizer.fingerprint} produced ids outside "
                        f"[0, {tokenizer.vocab_size}); the tokenizer file is inconsistent")
    return tokens.astype(dtype)


def _write_atomically(directory: str, name: str, write) -> str:
    final = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final


def _load_cached(path: str, dtype: np.dtype) -> np.ndarray | None:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if tokens.ndim != 1 or tokens.dtype != dtype or tokens.size == 0:
        return None
    return tokens


def load_or_build(files: Sequence[str], tokenizer, cache_dir: str | None) -> TokenCache:
    """Tokens of `files`, from `cache_dir` when cached there, else built (and saved).

    `cache_dir=None` keeps the tokens in memory only.  Several processes may
    build the same entry at once: each writes a temporary file and renames it.
    """
    files = tuple(files)
    key = cache_key(files, tokenizer.fingerprint)
    dtype = token_dtype(tokenizer.vocab_size)
    if cache_dir is None:
        return TokenCache(tokenize_files(files, tokenizer), key, None, files, built=True)
    name = f"tokens-{key[:32]}"
    path = os.path.join(cache_dir, name + ".npy")
    if os.path.isfile(path):
        tokens = _load_cached(path, dtype)
        if tokens is not None:
            return TokenCache(tokens, key, path, files, built=False)
    tokens = tokenize_files(files, tokenizer)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        _write_atomically(cache_dir, name + ".npy", lambda f: np.save(f, tokens))
        meta = {"format": CACHE_FORMAT, "key": key, "tokenizer": tokenizer.fingerprint,
                "num_tokens": int(tokens.size), "dtype": dtype.name,
                "files": [{"path": p, "sha256": text_files.file_sha256(p)} for p in files]}
        _write_atomically(cache_dir, name + ".json",
                          lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        raise DataError(f"cannot write the token cache in {cache_dir}: {e.strerror}; set "
                        f"data.cache_dir to a writable folder") from e
    return TokenCache(np.load(path, mmap_mode="r"), key, path, files, built=True)
