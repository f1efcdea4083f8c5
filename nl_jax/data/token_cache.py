"""Token cache: a file list + a tokenizer -> one 1-D token array on disk.

The files are read with `text_files.read_text`, tokenized one file (one
document) at a time, each followed by the tokenizer's eos id, and
concatenated.  The array is saved as ``tokens-<key>.npy`` (uint16 when the
vocabulary fits, else uint32) next to a ``.json`` describing it; it is
streamed to disk in batches of files, each batch encoded on all cores
(memory: the encodings of 16 MiB of text, or of the largest file; not
O(corpus)), and read back memory-mapped.  The key
hashes the tokenizer fingerprint, the tokenizer libraries' versions and the
SHA-256 of every file's bytes in order, so an edited file or another
tokenizer gives a new cache entry and an unchanged corpus is never tokenized
twice.  An entry is stored under the hashes of the bytes it was tokenized
from, so a file edited while the cache is built cannot leave a stale entry
under the new contents' key.

Integrity: the entry's ``.json`` records a CRC-32 of every chunk of
``CHUNK_TOKENS`` tokens; the array is handed out as ``VerifiedTokens``, which
checks each chunk the first time a read touches it (never the whole corpus at
startup) and the file's size before every read (a cache truncated under a
running job is an error, not a SIGBUS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import io
import json
import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence

import numpy as np

from nl_jax.data import text_files
from nl_jax.errors import DataError

# Bump when code that shapes the tokens changes: text_files.read_text's
# normalisation or how tokenizer.py builds a tokenizer from its files.
CACHE_FORMAT = 4   # 3: HF tokenizers with padding/truncation switched off; 4: chunk CRCs
CHUNK_TOKENS = 2**20     # tokens per checksummed chunk of a cache entry


def chunk_checksums(tokens: np.ndarray, chunk: int = CHUNK_TOKENS) -> list[int]:
    """CRC-32 of the bytes of every ``chunk`` tokens (the last chunk may be short)."""
    return [zlib.crc32(np.ascontiguousarray(tokens[i:i + chunk]).view(np.uint8))
            for i in range(0, int(tokens.size), chunk)]


class VerifiedTokens:
    """A cache entry's token array that verifies itself as it is read.

    Indexing (an int, a slice or an integer array, as ``np.memmap``) first
    checks that the file still has its size, then the CRC-32 of every chunk
    the read touches that no earlier read verified.  A mismatch is a
    ``DataError`` naming the file and the way out (delete it: it is rebuilt).
    """

    def __init__(self, tokens: np.ndarray, path: str, checksums: Sequence[int],
                 chunk: int = CHUNK_TOKENS):
        self._tokens, self.path, self._chunk = tokens, path, chunk
        self._checksums = list(checksums)
        self._verified = np.zeros(len(self._checksums), bool)
        self._file_bytes = os.path.getsize(path)
        self.size, self.dtype, self.shape, self.ndim = tokens.size, tokens.dtype, tokens.shape, 1

    def __len__(self) -> int:
        return int(self.size)

    def _fail(self, what: str):
        raise DataError(f"the token cache {self.path} {what}; delete it (it is rebuilt from "
                        f"the text files) and run the same command again")

    def _check(self, chunks: np.ndarray) -> None:
        try:
            size = os.path.getsize(self.path)
        except OSError as e:
            self._fail(f"cannot be read ({e.strerror})")
        if size != self._file_bytes:
            self._fail(f"changed size while in use ({size} bytes, {self._file_bytes} "
                       f"expected: truncated or overwritten)")
        for c in chunks[~self._verified[chunks]]:
            lo = int(c) * self._chunk
            got = zlib.crc32(np.ascontiguousarray(self._tokens[lo:lo + self._chunk])
                             .view(np.uint8))
            if got != self._checksums[c]:
                self._fail(f"is corrupted (tokens {lo}-{lo + self._chunk - 1}: checksum "
                           f"{got:08x}, recorded {self._checksums[c]:08x})")
            self._verified[c] = True

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, _ = index.indices(int(self.size))
            chunks = np.arange(lo // self._chunk, (max(hi, lo + 1) - 1) // self._chunk + 1)
        else:
            flat = np.asarray(index, dtype=np.int64).reshape(-1)
            flat = np.where(flat < 0, flat + int(self.size), flat)
            chunks = np.unique(flat // self._chunk)
        self._check(chunks[(chunks >= 0) & (chunks < len(self._checksums))])
        return self._tokens[index]

    def __array__(self, dtype=None, copy=None):
        self._check(np.arange(len(self._checksums)))
        if copy:
            return np.array(self._tokens, dtype=dtype, copy=True)
        return np.asarray(self._tokens, dtype=dtype)


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("tokenizers", "sentencepiece"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


@dataclasses.dataclass(frozen=True)
class TokenCache:
    """The tokens of a file list; `built` says whether this call tokenized them."""

    tokens: np.ndarray
    key: str
    path: str | None
    files: tuple[str, ...]
    built: bool
    file_hashes: tuple[str, ...] = ()   # SHA-256 of each file's bytes, in `files` order
    identity: str = ""                  # data_identity: what a resumed data stream checks


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id below `vocab_size`."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def data_identity(tokenizer_fingerprint: str, file_hashes: Sequence[str]) -> str:
    """Hex key of (tokenizer files, contents of the text files in order): the identity
    of a token stream, kept in checkpoints.  Unlike ``cache_key`` it leaves out the
    cache format and library versions, so upgrading those re-tokenizes the corpus
    but does not refuse a resume.  (The formula is the format-1 cache key, so
    checkpoints written before the split still match.)"""
    description = {"format": 1, "tokenizer": tokenizer_fingerprint,
                   "files": list(file_hashes)}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def cache_key(files: Sequence[str], tokenizer_fingerprint: str,
              file_hashes: Sequence[str] | None = None) -> str:
    """Hex key of (format, tokenizer, library versions, contents of the files in order).

    ``file_hashes`` (SHA-256 of each file's bytes) are computed when not given.
    """
    if file_hashes is None:
        file_hashes = [text_files.file_sha256(f) for f in files]
    description = {"format": CACHE_FORMAT, "tokenizer": tokenizer_fingerprint,
                   "libraries": _library_versions(), "files": list(file_hashes)}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


# Text bytes read for one parallel tokenizer call.  The library holds every
# document's encoding (ids, offsets, token strings: ~100 bytes a token) until the
# call returns, so this bounds the build's memory (or the largest file does).
BATCH_BYTES = 16 * 2**20


def _file_batches(files: Sequence[str]) -> Iterator[list[str]]:
    """`files` in order, grouped so that each group holds at most BATCH_BYTES of
    text (a larger file is a group of its own)."""
    group, size = [], 0
    for path in files:
        try:
            n = os.path.getsize(path)
        except OSError:
            n = 0      # read_text_hashed names the file and the problem
        if group and size + n > BATCH_BYTES:
            yield group
            group, size = [], 0
        group.append(path)
        size += n
    if group:
        yield group


def _batch_tokens(paths: Sequence[str], tokenizer, dtype: np.dtype
                  ) -> Iterator[tuple[np.ndarray, str]]:
    """Each document's ids followed by eos, and the SHA-256 of the bytes they came
    from.  The documents are encoded by one batch call, which the tokenizer
    libraries run on all cores (``encode_batch``; one ``encode`` per document for
    a tokenizer without it); each document is encoded on its own, as ``encode``
    would."""
    read = [text_files.read_text_hashed(path) for path in paths]
    texts = [text for text, _ in read]
    batch = getattr(tokenizer, "encode_batch", None)
    encoded = batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]
    for path, (_, sha), ids in zip(paths, read, encoded, strict=True):
        ids = np.asarray(list(ids) + [tokenizer.eos_id], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise DataError(f"tokenizer {tokenizer.fingerprint} produced ids outside "
                            f"[0, {tokenizer.vocab_size}) on {path}; the tokenizer file is "
                            f"inconsistent")
        yield ids.astype(dtype), sha


def _tokens(files: Sequence[str], tokenizer, dtype: np.dtype
            ) -> Iterator[tuple[np.ndarray, str]]:
    for group in _file_batches(files):
        yield from _batch_tokens(group, tokenizer, dtype)


def tokenize_files_hashed(files: Sequence[str], tokenizer) -> tuple[np.ndarray, list[str]]:
    """Concatenated tokens of the files (each followed by `tokenizer.eos_id`) and the
    SHA-256 of the bytes each file's tokens came from."""
    parts = list(_tokens(files, tokenizer, token_dtype(tokenizer.vocab_size)))
    return np.concatenate([ids for ids, _ in parts]), [sha for _, sha in parts]


def tokenize_files(files: Sequence[str], tokenizer) -> np.ndarray:
    """Concatenated tokens of the files, each followed by `tokenizer.eos_id`."""
    return tokenize_files_hashed(files, tokenizer)[0]


def _npy_header(dtype: np.dtype, count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": (count,)})
    return buffer.getvalue()


def _stream_npy(f, files: Sequence[str], tokenizer, dtype: np.dtype) -> list[str]:
    """Writes the tokens of `files` to `f` as a 1-D .npy, one file at a time.

    Memory: the encodings of one batch (BATCH_BYTES of text, or the largest file),
    not O(corpus): each batch of
    documents' ids goes straight to disk after a header slot that is filled in
    once the token count is known (the .npy header is padded to a fixed 128
    bytes for any realistic count).
    """
    slot = len(_npy_header(dtype, 10**18))
    f.write(b"\0" * slot)
    count, hashes = 0, []
    for ids, sha in _tokens(files, tokenizer, dtype):
        f.write(ids.tobytes())
        count += ids.size
        hashes.append(sha)
    header = _npy_header(dtype, count)
    if len(header) != slot:  # cannot happen for counts < 10**18; refuse rather than corrupt
        raise DataError(f"token count {count} does not fit the cache file header")
    f.seek(0)
    f.write(header)
    return hashes


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (os.umask can only be read by setting it, which would race
# with files other threads create).
_UMASK = _read_umask()


def _write_atomically(directory: str, name: str, write, rename: bool = True) -> str:
    """``write(f)`` into a temporary file in `directory`, synced, then renamed to `name`.

    With ``rename=False`` the complete temporary file is left for the caller
    to rename (its path is returned); it is removed if `write` fails.
    """
    final = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the bytes
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would lock out other users
        if not rename:
            return tmp
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return final


@contextlib.contextmanager
def _build_lock(directory: str, name: str) -> Iterator[None]:
    """One builder per cache entry at a time (``flock`` on ``.<name>.lock``): the
    processes of a host (one per GPU, say) that start together wait for the
    first to build the entry instead of each tokenizing the corpus on all cores.
    The lock file is removed by its holder; a process that then locks a new one
    finds the entry built."""
    path = os.path.join(directory, f".{name}.lock")
    with open(path, "a") as f:
        with contextlib.suppress(OSError):   # a file system without locks: no waiting
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.remove(path)


def _load_cached(path: str, dtype: np.dtype) -> VerifiedTokens | None:
    """The entry at ``path`` with its recorded chunk checksums; None (rebuild) if
    the array or its description is unreadable, truncated or of an older format."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        with open(path[:-len(".npy")] + ".json", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, EOFError):  # unreadable, truncated or empty: rebuild
        return None
    if tokens.ndim != 1 or tokens.dtype != dtype or tokens.size == 0:
        return None
    checksums = meta.get("chunk_crc32") if isinstance(meta, dict) else None
    if (meta.get("format") != CACHE_FORMAT or meta.get("chunk_tokens") != CHUNK_TOKENS
            or meta.get("num_tokens") != int(tokens.size) or not isinstance(checksums, list)
            or len(checksums) != -(-int(tokens.size) // CHUNK_TOKENS)):
        return None
    return VerifiedTokens(tokens, path, checksums)


def load_or_build(files: Sequence[str], tokenizer, cache_dir: str | None) -> TokenCache:
    """Tokens of `files`, from `cache_dir` when cached there, else built (and saved).

    `cache_dir=None` keeps the tokens in memory only.  Processes that need the same
    entry at once take turns (``_build_lock``): the first builds it, the others
    then read it.  Writes go to a temporary file that is renamed when complete.
    """
    files = tuple(files)
    dtype = token_dtype(tokenizer.vocab_size)
    if cache_dir is None:
        tokens, hashes = tokenize_files_hashed(files, tokenizer)
        return TokenCache(tokens, cache_key(files, tokenizer.fingerprint, hashes), None,
                          files, built=True, file_hashes=tuple(hashes),
                          identity=data_identity(tokenizer.fingerprint, hashes))
    hashes = [text_files.file_sha256(f) for f in files]
    key = cache_key(files, tokenizer.fingerprint, hashes)
    name = f"tokens-{key[:32]}"
    path = os.path.join(cache_dir, name + ".npy")

    def cached() -> TokenCache | None:
        tokens = _load_cached(path, dtype) if os.path.isfile(path) else None
        return None if tokens is None else TokenCache(
            tokens, key, path, files, built=False, file_hashes=tuple(hashes),
            identity=data_identity(tokenizer.fingerprint, hashes))

    found = cached()
    if found is not None:
        return found
    created = not os.path.isdir(cache_dir)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with _build_lock(cache_dir, name):
            found = cached()      # built by another process while this one waited
            if found is not None:
                return found
            return _build(files, tokenizer, cache_dir, dtype)
    except OSError as e:
        raise DataError(f"cannot write the token cache in {cache_dir}: {e.strerror}; set "
                        f"data.cache_dir to a writable folder") from e
    except DataError:   # a bad corpus file: leave no empty cache folder behind
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(cache_dir)
        raise


def _build(files: tuple[str, ...], tokenizer, cache_dir: str, dtype: np.dtype) -> TokenCache:
    """Tokenizes `files` into a new entry of `cache_dir` (see load_or_build)."""
    hashes: list[str] = []
    built = _write_atomically(
        cache_dir, ".building.npy",
        lambda f: hashes.extend(_stream_npy(f, files, tokenizer, dtype)), rename=False)
    key = cache_key(files, tokenizer.fingerprint, hashes)  # the bytes actually tokenized
    name = f"tokens-{key[:32]}"
    path = os.path.join(cache_dir, name + ".npy")
    os.replace(built, path)
    tokens = np.load(path, mmap_mode="r")
    checksums = chunk_checksums(tokens)
    meta = {"format": CACHE_FORMAT, "key": key, "tokenizer": tokenizer.fingerprint,
            "num_tokens": int(tokens.size), "dtype": dtype.name,
            "libraries": _library_versions(),
            "chunk_tokens": CHUNK_TOKENS, "chunk_crc32": checksums,
            "files": [{"path": p, "sha256": h} for p, h in zip(files, hashes, strict=True)]}
    _write_atomically(cache_dir, name + ".json",
                      lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return TokenCache(VerifiedTokens(tokens, path, checksums), key, path, files, built=True,
                      file_hashes=tuple(hashes),
                      identity=data_identity(tokenizer.fingerprint, hashes))
