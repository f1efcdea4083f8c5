"""Prepared token shards: tokenize a corpus once, train from it through grain.

``python -m nl_jax data prepare --config FILE --input PATTERN... --out DIR``
(`prepare`) reads plain-text files (one document a file, as data.train_files),
JSON Lines (one document a line, its ``--text_field``) or Parquet (one
document a row of the ``--text_field`` column), plain or ``.gz`` / ``.zst``
compressed, tokenizes every document with the config's ``data.tokenizer`` on
all cores (worker processes) and writes:

* ``shard-NNNNN.array_record``: ArrayRecord (``group_size:1``, zstd), one
  record per document: its token ids followed by the tokenizer's eos id, as
  little-endian ``uint16`` (vocabularies up to 65536) or ``uint32``.  A shard
  is closed after the document that brings it to ``--shard_tokens`` tokens;
  documents are never split.
* ``shard-NNNNN.index.npy``: int64 ``[documents + 1]``, the offset of every
  document's first token in the shard (a prefix sum of the record lengths).
* ``shard-NNNNN.done.json``: written (atomically, after the shard and its
  index are synced and renamed into place) when a shard is complete.  A rerun
  of the same command skips the complete shards and restarts after the last
  one's input record, so a killed preparation resumes where it stopped and
  gives the same shards as an uninterrupted one.
* ``manifest.json`` (`MANIFEST`, written last): format version, tokenizer
  (fingerprint, kind, path, vocabulary size, eos id), token dtype, input files
  (format, bytes, SHA-256, records), per shard its documents, tokens, bytes and
  SHA-256 (shard and index), the totals, and the bad records.

Bad records (a line that is not valid JSON or not UTF-8, a JSON value that is
not an object, a missing or non-string text field, an empty document) are
skipped, counted by reason and reported with their first locations; they are
never trained on.  Blank JSON Lines lines are skipped silently.

Training (`open_corpus`, used by ``nl_jax.data.pipeline`` when
``data.prepared`` names a prepared folder) sees the concatenation of all
records of all shards in order, the same token stream the text-file path
builds (documents in order, each followed by eos), as a random-access token
array (`PreparedTokens`): token ``t`` is found by binary search in the
per-shard prefix sum of token counts (from the manifest: startup reads one
JSON file, O(shards)) and then in the shard's document index, and is read
with grain's ``ArrayRecordDataSource``.  A shard is opened, and its file and
index checked against the manifest's SHA-256, the first time a read touches
it in a process (never the whole corpus at startup).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from nl_jax.data import text_files, token_cache
from nl_jax.errors import DataError, UserError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
JOB = "prepare.json"                 # the preparation's settings, written first
FORMATS = ("txt", "jsonl", "parquet")
DEFAULT_SHARD_TOKENS = 2**26         # 128 MiB of uint16 ids a shard
WRITER_OPTIONS = "group_size:1,zstd:3"
BATCH_BYTES = 1 << 20                # input bytes sent to a worker at once
EXAMPLES = 10                        # bad-record locations kept for the report
DATA_EXTRA = "pip install 'nl_jax[data]'"

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.array_record"


def _index_name(i: int) -> str:
    return f"shard-{i:05d}.index.npy"


def _done_name(i: int) -> str:
    return f"shard-{i:05d}.done.json"


# ----------------------------------------------------------------------------
# Inputs: files -> raw records
# ----------------------------------------------------------------------------

def split_suffix(path: str) -> tuple[str, str | None]:
    """(the name's format-bearing suffix, compression or None) of an input file."""
    name = os.path.basename(path).lower()
    compression = None
    for suffix, kind in _COMPRESSED.items():
        if name.endswith(suffix):
            name, compression = name[:-len(suffix)], kind
            break
    return os.path.splitext(name)[1], compression


def input_format(path: str, requested: str | None) -> str:
    """The format to read `path` in: `requested` (--format), or the one its name
    says (``.jsonl``/``.ndjson``/``.json`` -> jsonl, ``.parquet`` -> parquet,
    anything else -> txt).  A JSON Lines or Parquet file given as txt is refused:
    it would be trained on as raw JSON or bytes."""
    suffix, compression = split_suffix(path)
    named = ("jsonl" if suffix in _JSONL_SUFFIXES else
             "parquet" if suffix == ".parquet" else "txt")
    if compression and named == "parquet":
        raise DataError(f"--input {path}: a compressed Parquet file; Parquet compresses its "
                        f"own columns, give the .parquet file itself")
    if requested is None:
        return named
    if requested == "txt" and named != "txt":
        what = "a JSON Lines" if named == "jsonl" else "a Parquet"
        raise DataError(f"--input {path} is {what} file, but --format txt would tokenize it "
                        f"as raw text (keys, quotes and all); pass --format {named} "
                        f"[--text_field FIELD], or leave --format out to go by the file name")
    if (requested == "parquet") != (named == "parquet"):
        raise DataError(f"--input {path}: --format {requested} does not read a "
                        f"{named} file; leave --format out to go by the file name")
    return requested


def _require_module(name: str, why: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"{why} needs the Python package {name!r}, which is not installed; "
                        f"{DATA_EXTRA}") from None


class _HashingReader(io.RawIOBase):
    """A binary file read through: counts and SHA-256-hashes the bytes read."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
            self.bytes_read += n
        return n or 0

    def drain(self) -> None:
        """Reads to the end (so `sha` covers the whole file)."""
        buffer = bytearray(1 << 20)
        while self.readinto(buffer):
            pass


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[tuple[io.BufferedIOBase, _HashingReader]]:
    """(decompressed binary stream, the reader of the file's bytes) of an input."""
    _, compression = split_suffix(path)
    try:
        raw = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"--input {path}: cannot read it ({e.strerror}); check that it "
                        f"exists and is readable") from e
    with raw:
        hashing = _HashingReader(raw)
        buffered = io.BufferedReader(hashing, 1 << 20)
        if compression == "gzip":
            import gzip
            stream = gzip.GzipFile(fileobj=buffered, mode="rb")
        elif compression == "zstd":
            zstandard = _require_module("zstandard", f"--input {path} (zstd-compressed)")
            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(
                buffered, read_across_frames=True), 1 << 20)
        else:
            stream = buffered
        try:
            yield stream, hashing
        except (OSError, EOFError, ValueError) as e:
            raise DataError(f"--input {path}: cannot decompress it ({e}); the file is "
                            f"damaged or truncated: replace it or leave it out") from e
        except Exception as e:   # zstandard.ZstdError
            if type(e).__name__ != "ZstdError":
                raise
            raise DataError(f"--input {path}: cannot decompress it ({e}); the file is "
                            f"damaged or truncated: replace it or leave it out") from e
        # the bytes after the last record (a gzip trailer, say) count in the hash
        hashing.drain()


@dataclasses.dataclass
class _Input:
    path: str
    format: str
    bytes: int
    mtime_ns: int
    sha256: str = ""
    records: int = 0


def _text_field_type_ok(arrow_type) -> bool:
    import pyarrow as pa
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))


def _records(inputs: Sequence[_Input], text_field: str, skip: int, progress
             ) -> Iterator[tuple[str, Any, str]]:
    """(kind, payload, location) of every raw record of the inputs in order,
    the first `skip` of them left out (read and hashed, not yielded).

    kind ``txt``: the file's bytes; ``jsonl``: a line's bytes (no newline);
    ``parquet``: the row's text (str or None).  Fills each input's `sha256`
    (of the file's bytes on disk) and `records`.  `progress(n)` is told the
    bytes read from disk.
    """
    index = 0
    for item in inputs:
        if item.format == "parquet":
            pq = _require_module("pyarrow.parquet", f"--input {item.path} (Parquet)")
            try:
                pfile = pq.ParquetFile(item.path)
            except Exception as e:   # pyarrow.ArrowInvalid and friends
                raise DataError(f"--input {item.path}: cannot read it as Parquet ({e}); "
                                f"replace it or leave it out") from e
            schema = pfile.schema_arrow
            if text_field not in schema.names:
                raise DataError(f"--input {item.path} has no column {text_field!r} (columns: "
                                f"{', '.join(schema.names)}); pass --text_field COLUMN")
            if not _text_field_type_ok(schema.field(text_field).type):
                raise DataError(f"--input {item.path}: column {text_field!r} holds "
                                f"{schema.field(text_field).type}, not strings; pass the "
                                f"text column with --text_field COLUMN")
            rows, total = 0, max(pfile.metadata.num_rows, 1)
            for batch in pfile.iter_batches(columns=[text_field], batch_size=1024):
                for value in batch.column(0).to_pylist():
                    if index >= skip:
                        yield "parquet", value, f"{item.path} row {rows + 1}"
                    index += 1
                    rows += 1
                progress(item.bytes * min(rows, total) // total
                         - item.bytes * (rows - batch.num_rows) // total)
            item.records = rows
            item.sha256 = text_files.file_sha256(item.path)
            continue
        with _open_input(item.path) as (stream, hashing):
            seen = 0
            if item.format == "txt":
                data = stream.read()
                if index >= skip:
                    yield "txt", data, item.path
                index += 1
                item.records = 1
            else:
                for number, line in enumerate(stream, 1):
                    if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                        line = line[3:]
                    if index >= skip:
                        yield "jsonl", line, f"{item.path} line {number}"
                    index += 1
                    item.records = number
                    if hashing.bytes_read - seen >= BATCH_BYTES:
                        progress(hashing.bytes_read - seen)
                        seen = hashing.bytes_read
        progress(hashing.bytes_read - seen)
        item.sha256 = hashing.sha.hexdigest()


# ----------------------------------------------------------------------------
# Workers: raw records -> token ids (or why a record is bad)
# ----------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _document_text(kind: str, payload: Any, text_field: str) -> str | tuple[str] | None:
    """A record's document text, None for a blank JSON Lines line, or (reason,)
    for a bad record."""
    if kind == "parquet":
        if payload is None:
            return (f"{text_field!r} is null",)
        text = payload
    else:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return ("not UTF-8",)
        if kind == "jsonl":
            if not text.strip():
                return None
            try:
                value = json.loads(text)
            except ValueError:
                return ("invalid JSON",)
            if not isinstance(value, dict):
                return ("not a JSON object",)
            if text_field not in value:
                return (f"no field {text_field!r}",)
            text = value[text_field]
            if not isinstance(text, str):
                return (f"field {text_field!r} is not a string",)
    text = text_files.normalise(text)
    if not text.strip():
        return ("empty text",)
    return text


def _tokenize(batch: Sequence[tuple[str, Any]], tokenizer, text_field: str,
              use_batch_call: bool) -> list[np.ndarray | str | None]:
    """Per record: its ids followed by eos (little-endian token dtype), None for
    a blank line, or the reason it is bad (a str)."""
    texts = [_document_text(kind, payload, text_field) for kind, payload in batch]
    good = [t for t in texts if isinstance(t, str)]
    call = getattr(tokenizer, "encode_batch", None) if use_batch_call else None
    encoded = iter(call(good) if call is not None else [tokenizer.encode(t) for t in good])
    dtype = token_cache.token_dtype(tokenizer.vocab_size).newbyteorder("<")
    out: list[np.ndarray | str | None] = []
    for text in texts:
        if text is None or isinstance(text, tuple):
            out.append(None if text is None else text[0])
            continue
        ids = np.asarray(list(next(encoded)) + [tokenizer.eos_id], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
            raise DataError(f"tokenizer {tokenizer.fingerprint} produced ids outside "
                            f"[0, {tokenizer.vocab_size}); the tokenizer file is inconsistent")
        out.append(ids.astype(dtype))
    return out


def _worker_init(tok_cfg: dict, base_dir: str, fingerprint: str, text_field: str) -> None:
    """Loads the tokenizer in a worker process.  A failure is kept and raised by
    the worker's tasks, so that it reaches the parent as the error it is."""
    # One process a core: the tokenizer library's own threads would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from nl_jax.data.tokenizer import load_tokenizer
    try:
        tokenizer = load_tokenizer(tok_cfg, base_dir)
        if tokenizer.fingerprint != fingerprint:
            raise DataError(f"the tokenizer {tok_cfg.get('path')} changed while preparing; "
                            f"run the command again")
    except Exception as e:    # re-raised by _worker_tokenize
        _WORKER["error"] = e
        return
    _WORKER.update(tokenizer=tokenizer, text_field=text_field)


def _worker_tokenize(batch):
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _tokenize(batch, _WORKER["tokenizer"], _WORKER["text_field"], use_batch_call=False)


# ----------------------------------------------------------------------------
# Output: shards, done records, manifest
# ----------------------------------------------------------------------------

def _write_json(directory: str, name: str, value: Any) -> None:
    token_cache._write_atomically(  # the cache's write-sync-rename
        directory, name, lambda f: f.write(json.dumps(value, indent=1).encode()))


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _ShardWriter:
    """Writes one shard: records to a temporary ArrayRecord file, then (`finish`)
    the file and its document index renamed into place."""

    def __init__(self, directory: str, index: int):
        from array_record.python import array_record_module
        self.directory, self.index = directory, index
        self.tmp = os.path.join(directory, f".{_shard_name(index)}.tmp")
        self._writer = array_record_module.ArrayRecordWriter(self.tmp, WRITER_OPTIONS)
        self.offsets = [0]

    @property
    def tokens(self) -> int:
        return self.offsets[-1]

    def add(self, ids: np.ndarray) -> None:
        self._writer.write(ids.tobytes())
        self.offsets.append(self.offsets[-1] + int(ids.size))

    def finish(self) -> dict[str, Any]:
        """Closes, syncs and renames the shard and writes its index; its entry."""
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(self.tmp, 0o666 & ~token_cache._UMASK)
        path = os.path.join(self.directory, _shard_name(self.index))
        os.replace(self.tmp, path)
        offsets = np.asarray(self.offsets, dtype="<i8")
        index_path = token_cache._write_atomically(
            self.directory, _index_name(self.index), lambda f: np.save(f, offsets))
        return {"file": _shard_name(self.index), "index_file": _index_name(self.index),
                "documents": len(self.offsets) - 1, "tokens": self.tokens,
                "bytes": os.path.getsize(path), "sha256": text_files.file_sha256(path),
                "index_bytes": os.path.getsize(index_path),
                "index_sha256": text_files.file_sha256(index_path)}

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)


def _resume_point(out: str) -> list[dict[str, Any]]:
    """The done records of the complete shards 0..k-1 (their files present with
    the recorded sizes); removes every later shard file and temporary file."""
    done: list[dict[str, Any]] = []
    while True:
        path = os.path.join(out, _done_name(len(done)))
        try:
            record = _read_json(path)
            shard = record["shard"]
            ok = all(os.path.getsize(os.path.join(out, shard[f])) == shard[b]
                     for f, b in (("file", "bytes"), ("index_file", "index_bytes")))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        done.append(record)
    for name in os.listdir(out):
        stale = name.startswith(".") and name.endswith(".tmp")
        if name.startswith("shard-") and not stale:
            with contextlib.suppress(ValueError):
                stale = int(name[len("shard-"):len("shard-") + 5]) >= len(done)
        if stale:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))
    return done


def _check_out_dir(out: str, job: dict[str, Any]) -> bool:
    """Creates `out` or checks that it holds this preparation; True when its
    manifest is already written (nothing left to do)."""
    job_path = os.path.join(out, JOB)
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(job_path):
            raise DataError(f"--out {out} is a folder that `data prepare` did not make "
                            f"(no {JOB}); give a new or empty folder")
        try:
            old = _read_json(job_path)
        except (OSError, ValueError):
            old = None
        if old != job:
            changed = (sorted(k for k in set(job) | set(old) if job.get(k) != old.get(k))
                       if isinstance(old, dict) else ["unreadable " + JOB])
            raise DataError(f"--out {out} holds a preparation of other inputs or settings "
                            f"(differs in: {', '.join(changed)}); give a new --out, or "
                            f"delete {out} to prepare again")
        return os.path.isfile(os.path.join(out, MANIFEST))
    try:
        os.makedirs(out, exist_ok=True)
        _write_json(out, JOB, job)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write there ({e.strerror}); give a writable "
                        f"folder") from e
    return False


def _tokenizer_info(tok_cfg, tokenizer) -> dict[str, Any]:
    path = tok_cfg.get("path")
    return {"fingerprint": tokenizer.fingerprint, "kind": tok_cfg.get("kind"),
            "path": path if isinstance(path, str) else list(path),
            "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id)}


def _summary(bad: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(bad.items(), key=lambda x: -x[1]))


def prepare(patterns: Sequence[str], out: str, tok_cfg, *, base_dir: str,
            fmt: str | None = None, text_field: str = "text", workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True,
            stop_after_shards: int | None = None, cwd: str | None = None
            ) -> dict[str, Any] | None:
    """Tokenizes the files `patterns` match (relative to `cwd`, default the
    current folder) into prepared shards in `out`; returns the manifest.

    `tok_cfg`: the config's ``data.tokenizer`` (relative paths from
    `base_dir`).  `fmt`: ``txt``, ``jsonl``, ``parquet`` or None (each file's
    name decides, see `input_format`).  `workers`: tokenizer processes
    (default: one a core; 1 tokenizes in this process).  A rerun with the same
    inputs and settings resumes after the last complete shard.
    `stop_after_shards` stops once that many shards are complete and returns
    None (the preparation is then unfinished, as if killed).
    """
    from nl_jax.data.tokenizer import load_tokenizer

    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not isinstance(shard_tokens, int) or shard_tokens <= 0:
        raise UserError(f"--shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not text_field:
        raise UserError("--text_field is empty; name the JSON field or Parquet column "
                        "holding the text")
    cwd = cwd or os.getcwd()
    out = os.path.abspath(os.path.join(cwd, os.path.expanduser(out)))
    files = text_files.match_files(patterns, cwd, key="--input")
    inputs = []
    for path in files:
        if os.path.abspath(path).startswith(out + os.sep):
            raise DataError(f"--input {path} lies inside --out {out}; give the corpus files, "
                            f"not the prepared folder")
        st = os.stat(path)
        inputs.append(_Input(path, input_format(path, fmt), st.st_size, st.st_mtime_ns))
    for item in inputs:   # refuse a missing optional package before any work
        if item.format == "parquet":
            _require_module("pyarrow", f"--input {item.path} (Parquet)")
        if split_suffix(item.path)[1] == "zstd":
            _require_module("zstandard", f"--input {item.path} (zstd-compressed)")
    tokenizer = load_tokenizer(tok_cfg, base_dir)
    dtype = token_cache.token_dtype(tokenizer.vocab_size)
    uses_field = any(i.format != "txt" for i in inputs)
    job = {"format_version": FORMAT_VERSION, "tokenizer": _tokenizer_info(tok_cfg, tokenizer),
           "text_field": text_field if uses_field else None, "shard_tokens": shard_tokens,
           "writer_options": WRITER_OPTIONS, "dtype": dtype.name,
           "inputs": [{"path": i.path, "format": i.format, "bytes": i.bytes,
                       "mtime_ns": i.mtime_ns} for i in inputs]}
    if _check_out_dir(out, job):
        return _read_json(os.path.join(out, MANIFEST))
    done = _resume_point(out)
    start = done[-1]["records_end"] if done else 0
    bad = collections.Counter(done[-1]["bad"] if done else {})
    examples = list(done[-1]["bad_examples"]) if done else []

    from tqdm import tqdm
    bar = tqdm(total=sum(i.bytes for i in inputs), unit="B", unit_scale=True,
               desc=f"data prepare -> {os.path.basename(out)}", disable=not progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    if done:
        bar.write(f"resuming {out}: {len(done)} shard(s) complete, continuing at input "
                  f"record {start}")
    workers = workers or len(os.sched_getaffinity(0))
    pool = None
    if workers > 1:
        # spawn: the parent may hold JAX's or the tokenizer library's threads.  A
        # worker that dies (killed for memory, say) breaks the executor: an error,
        # not a wait forever.
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(dict(tok_cfg), base_dir, tokenizer.fingerprint, text_field))
    shards = [d["shard"] for d in done]
    writer: _ShardWriter | None = None
    record_index = start
    documents = sum(s["documents"] for s in shards)
    tokens = sum(s["tokens"] for s in shards)

    def batches() -> Iterator[tuple[list, list[str]]]:
        batch, where, size = [], [], 0
        for kind, payload, location in _records(inputs, text_field, start, bar.update):
            batch.append((kind, payload))
            where.append(location)
            size += len(payload) if isinstance(payload, (bytes, str)) else 0
            if size >= BATCH_BYTES or len(batch) >= 4096:
                yield batch, where
                batch, where, size = [], [], 0
        if batch:
            yield batch, where

    def results() -> Iterator[tuple[np.ndarray | str | None, str]]:
        if pool is None:
            for batch, where in batches():
                yield from zip(_tokenize(batch, tokenizer, text_field, use_batch_call=True),
                               where, strict=True)
            return
        def finished(future) -> list:
            try:
                return future.result()
            except BrokenProcessPool:
                raise DataError(f"a tokenizer worker process of `data prepare` died (out of "
                                f"memory?); run the same command again to resume from the "
                                f"last complete shard, with fewer --workers than "
                                f"{workers}") from None

        pending: collections.deque = collections.deque()
        for batch, where in batches():     # at most 2 batches a worker in flight
            pending.append((pool.submit(_worker_tokenize, batch), where))
            while len(pending) >= 2 * workers:
                done_batch, done_where = pending.popleft()
                yield from zip(finished(done_batch), done_where, strict=True)
        while pending:
            done_batch, done_where = pending.popleft()
            yield from zip(finished(done_batch), done_where, strict=True)

    def close_shard() -> None:
        nonlocal writer
        shard = writer.finish()
        writer = None
        shards.append(shard)
        _write_json(out, _done_name(shard_index), {
            "shard": shard, "records_end": record_index, "bad": dict(bad),
            "bad_examples": examples})
        bar.set_postfix(shards=len(shards), docs=documents, tokens=tokens,
                        bad=sum(bad.values()), refresh=False)

    shard_index = len(shards)
    try:
        for result, location in results():
            record_index += 1
            if result is None:
                continue
            if isinstance(result, str):
                bad[result] += 1
                if len(examples) < EXAMPLES:
                    examples.append(f"{location}: {result}")
                continue
            if writer is None:
                writer = _ShardWriter(out, shard_index)
            writer.add(result)
            documents += 1
            tokens += int(result.size)
            if writer.tokens >= shard_tokens:
                close_shard()
                shard_index += 1
                if stop_after_shards is not None and len(shards) >= stop_after_shards:
                    return None
        if writer is not None:
            close_shard()
    finally:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if not shards:
        raise DataError(f"--input {' '.join(patterns)}: no document to train on in "
                        f"{record_index} record(s)"
                        + (f" ({_summary(bad)}; first: {examples[0]})" if bad else "")
                        + "; check --format and --text_field")
    fingerprints = [f"{i.format}:{text_field}:{i.sha256}" if i.format != "txt" else i.sha256
                    for i in inputs]
    manifest = {
        "format": "nl_jax.prepared", "format_version": FORMAT_VERSION,
        "tokenizer": job["tokenizer"], "dtype": dtype.name, "byte_order": "little",
        "record": "one document per record: its token ids, then eos",
        "writer_options": WRITER_OPTIONS, "shard_tokens": shard_tokens,
        "text_field": job["text_field"],
        "identity": token_cache.data_identity(tokenizer.fingerprint, fingerprints),
        "documents": documents, "tokens": tokens, "records": record_index,
        "bad_records": dict(bad), "bad_examples": examples,
        "inputs": [{"path": i.path, "format": i.format, "bytes": i.bytes,
                    "sha256": i.sha256, "records": i.records} for i in inputs],
        "shards": shards}
    _write_json(out, MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------
# Reading: manifest -> random-access token stream
# ----------------------------------------------------------------------------

def read_manifest(folder: str, key: str = "data.prepared") -> dict[str, Any]:
    """The folder's manifest, checked for format and completeness."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise DataError(f"{key}: {folder} is not a folder; give the --out folder of "
                        f"`python -m nl_jax data prepare`")
    if not os.path.isfile(path):
        unfinished = os.path.isfile(os.path.join(folder, JOB))
        why = ("its `data prepare` did not finish; run the same command again to complete "
               "it" if unfinished else "prepare the corpus with `python -m nl_jax data "
               "prepare --config FILE --input ... --out DIR`")
        raise DataError(f"{key}: {folder} has no {MANIFEST}; {why}")
    try:
        manifest = _read_json(path)
        shards = manifest["shards"]
        ok = (manifest.get("format") == "nl_jax.prepared" and isinstance(shards, list)
              and all(isinstance(s["tokens"], int) and s["tokens"] > 0 for s in shards))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise DataError(f"{key}: {path} is unreadable or not a manifest written by `nl_jax "
                        f"data prepare`; prepare the corpus again into a new folder")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{key}: {path} has format version {manifest.get('format_version')}, "
                        f"this nl_jax reads {FORMAT_VERSION}; prepare the corpus again with "
                        f"this version")
    return manifest


def check_tokenizer(manifest: dict[str, Any], folder: str, tokenizer, tok_cfg,
                    key: str = "data.prepared") -> None:
    """A `DataError` unless the manifest was made with `tokenizer`."""
    made = manifest["tokenizer"]
    if made.get("fingerprint") != tokenizer.fingerprint:
        raise DataError(
            f"{key}: {folder} was prepared with tokenizer {made.get('kind')} "
            f"{made.get('path')} ({made.get('fingerprint')}), but data.tokenizer is "
            f"{tok_cfg.get('kind')} {tok_cfg.get('path')} ({tokenizer.fingerprint}); set "
            f"data.tokenizer to the one it was prepared with, or prepare the corpus again "
            f"with this config's tokenizer into a new folder")


class PreparedTokens:
    """The token stream of a prepared folder as a read-only 1-D array.

    Indexing (an int, a slice or an integer array of any shape, as a numpy
    array) returns the tokens at those positions of the concatenation of all
    shards' records.  Startup holds only the per-shard prefix sum of token
    counts; a shard is opened the first time a read touches it: its file and
    document index are checked against the manifest's sizes and SHA-256 (a
    mismatch is a `DataError` naming the shard and the way out), its index is
    loaded and a grain ``ArrayRecordDataSource`` is opened on it.
    """

    def __init__(self, folder: str, manifest: dict[str, Any]):
        self.folder, self._manifest = folder, manifest
        self._shards = manifest["shards"]
        self._prefix = np.zeros(len(self._shards) + 1, dtype=np.int64)
        np.cumsum([s["tokens"] for s in self._shards], out=self._prefix[1:])
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.size = int(self._prefix[-1])
        self.shape, self.ndim = (self.size,), 1
        self._open: dict[int, tuple[Any, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.size

    def _fail(self, shard: dict, what: str):
        path = os.path.join(self.folder, shard["file"])
        raise DataError(
            f"prepared shard {path} {what}: it was damaged or changed after `data prepare`; "
            f"check every shard with `python -m nl_jax data prepare --verify --out "
            f"{self.folder}`, then restore the shard from a copy or prepare the corpus again "
            f"into a new folder")

    def verify_shard(self, s: int) -> None:
        """Checks shard `s`'s file and index against the manifest (sizes, SHA-256)."""
        shard = self._shards[s]
        for name, size, sha in ((shard["file"], shard["bytes"], shard["sha256"]),
                                (shard["index_file"], shard["index_bytes"],
                                 shard["index_sha256"])):
            path = os.path.join(self.folder, name)
            try:
                got = os.path.getsize(path)
            except OSError as e:
                self._fail(shard, f"({name}) cannot be read ({e.strerror})")
            if got != size:
                self._fail(shard, f"({name}) has {got} bytes, the manifest records {size}")
            digest = text_files.file_sha256(path)
            if digest != sha:
                self._fail(shard, f"({name}) fails its checksum (sha256 {digest[:16]}..., "
                           f"the manifest records {sha[:16]}...)")

    def _shard(self, s: int) -> tuple[Any, np.ndarray]:
        found = self._open.get(s)
        if found is not None:
            return found
        with self._lock:
            if s in self._open:
                return self._open[s]
            from grain.sources import ArrayRecordDataSource
            self.verify_shard(s)
            shard = self._shards[s]
            offsets = np.load(os.path.join(self.folder, shard["index_file"]),
                              allow_pickle=False)
            try:
                source = ArrayRecordDataSource(os.path.join(self.folder, shard["file"]))
                count = len(source)
            except Exception as e:   # the ArrayRecord reader raises bare errors
                self._fail(shard, f"cannot be opened as ArrayRecord ({e})")
            if (offsets.ndim != 1 or offsets.size != shard["documents"] + 1 or offsets[0] != 0
                    or offsets[-1] != shard["tokens"] or count != shard["documents"]):
                self._fail(shard, "does not match its manifest entry (documents or tokens)")
            self._open[s] = (source, np.asarray(offsets, dtype=np.int64))
            return self._open[s]

    def _read_flat(self, flat: np.ndarray) -> np.ndarray:
        out = np.empty(flat.shape, dtype=self.dtype)
        shard_of = np.searchsorted(self._prefix, flat, side="right") - 1
        for s in np.unique(shard_of):
            mask = shard_of == s
            local = flat[mask] - self._prefix[s]
            source, offsets = self._shard(int(s))
            doc = np.searchsorted(offsets, local, side="right") - 1
            docs, inverse = np.unique(doc, return_inverse=True)
            records = source.__getitems__([int(d) for d in docs])
            lengths = offsets[docs + 1] - offsets[docs]
            for d, record, length in zip(docs, records, lengths, strict=True):
                if len(record) != length * self.dtype.itemsize:
                    self._fail(self._shards[s], f"record {d} has {len(record)} bytes, its "
                               f"index says {length} tokens")
            joined = np.frombuffer(b"".join(records), dtype=self.dtype)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            out[mask] = joined[starts[inverse] + local - offsets[docs][inverse]]
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._read_flat(np.arange(*index.indices(self.size), dtype=np.int64))
        positions = np.asarray(index)
        if positions.dtype.kind not in "iu":
            raise TypeError(f"prepared tokens take integer indices, got {positions.dtype}")
        positions = positions.astype(np.int64)
        positions = np.where(positions < 0, positions + self.size, positions)
        if positions.size and (positions.min() < 0 or positions.max() >= self.size):
            raise IndexError(f"token index out of range for {self.size} tokens")
        flat = self._read_flat(positions.reshape(-1)).reshape(positions.shape)
        return flat[()] if positions.ndim == 0 else flat

    def __array__(self, dtype=None, copy=None):
        """The whole stream in memory (reads every shard: O(corpus))."""
        return self[:].astype(dtype or self.dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    """A prepared folder opened for training."""

    folder: str
    tokens: PreparedTokens
    identity: str                  # data_identity: what a resumed data stream checks
    file_hashes: dict[str, str]    # plain-text input file -> SHA-256 (held-out check)
    manifest: dict[str, Any]


def open_corpus(folder: str, tokenizer, tok_cfg, key: str = "data.prepared"
                ) -> PreparedCorpus:
    """The prepared folder's token stream, after checking its manifest's
    tokenizer against `tokenizer` (O(shards): reads only the manifest).

    The identity is the manifest's: for plain-text inputs the same
    ``data_identity`` the text-file path gives those files, so a run started on
    the text files resumes on their prepared shards.
    """
    manifest = read_manifest(folder, key)
    check_tokenizer(manifest, folder, tokenizer, tok_cfg, key)
    if manifest["dtype"] != token_cache.token_dtype(tokenizer.vocab_size).name:
        raise DataError(f"{key}: {folder} holds {manifest['dtype']} ids, not the "
                        f"tokenizer's; prepare the corpus again into a new folder")
    hashes = {i["path"]: i["sha256"] for i in manifest["inputs"] if i["format"] == "txt"}
    return PreparedCorpus(folder, PreparedTokens(folder, manifest), manifest["identity"],
                          hashes, manifest)


def verify(folder: str, tokenizer=None, tok_cfg=None) -> dict[str, Any]:
    """Checks every shard of a prepared folder (sizes, SHA-256, index, record
    counts); a `DataError` naming the failing shards.  Returns the manifest."""
    manifest = read_manifest(folder, "--out")
    if tokenizer is not None:
        check_tokenizer(manifest, folder, tokenizer, tok_cfg, "--out")
    tokens = PreparedTokens(folder, manifest)
    failed = []
    for s, shard in enumerate(manifest["shards"]):
        try:
            tokens._shard(s)
        except DataError as e:
            failed.append((shard["file"], str(e)))
    if failed:
        names = ", ".join(name for name, _ in failed[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise DataError(f"{len(failed)} of {len(manifest['shards'])} shards of {folder} fail "
                        f"verification ({names}{more}); first: {failed[0][1]}")
    return manifest


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------

HELP = f"""usage: python -m nl_jax data prepare --config FILE[:ARG] [--config.KEY=VALUE ...]
                              --input PATTERN... --out DIR [--format txt|jsonl|parquet]
                              [--text_field text] [--shard_tokens N] [--workers N]
                              [--no_progress] [--verify]
       python -m nl_jax data prepare --verify --out DIR [--config FILE]

Tokenizes a corpus once, with the config's data.tokenizer on all cores, into
ArrayRecord shards of token ids (one record per document, eos after each) and
a manifest.json; train on it with --config.data.prepared=DIR.  A rerun of an
interrupted command resumes after its last complete shard.

  --config FILE[:ARG]   the config whose data.tokenizer tokenizes (default:
                        nl_jax/configs/hope/tiny.py); --config.KEY=VALUE overrides
  --input PATTERN...    files or glob patterns (relative to the current folder);
                        .gz and .zst are decompressed (.zst needs {DATA_EXTRA})
  --format F            txt: a file is one document (as data.train_files);
                        jsonl: a line is one JSON object, its --text_field the
                        document; parquet: a row, its --text_field column
                        (needs {DATA_EXTRA}).  Default: by each file's name
                        (.jsonl/.ndjson/.json, .parquet, else txt).  A JSON Lines
                        file is never read as txt.
  --text_field NAME     the JSON field / Parquet column holding the text (default text)
  --out DIR             the prepared folder (new, empty, or this command's own)
  --shard_tokens N      close a shard after the document that reaches N tokens
                        (default {DEFAULT_SHARD_TOKENS})
  --workers N           tokenizer processes (default: one a core)
  --no_progress         no progress bar
  --verify              check every shard of DIR against its manifest (sizes,
                        SHA-256, document index); after preparing, if --input is given

Bad records (invalid JSON, not UTF-8, no text field, empty) are skipped,
counted and reported, never trained on."""


def _parse(argv: Sequence[str]):
    from nl_jax import config as config_lib
    spec, overrides, rest = config_lib.parse_overrides(list(argv))
    parser = argparse.ArgumentParser(prog="nl_jax data prepare", add_help=False,
                                     exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--input", nargs="+")
    parser.add_argument("--out")
    parser.add_argument("--format")
    parser.add_argument("--text_field", default="text")
    parser.add_argument("--shard_tokens", default=str(DEFAULT_SHARD_TOKENS))
    parser.add_argument("--workers")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--verify", action="store_true")
    try:
        args, unknown = parser.parse_known_args(rest)
    except argparse.ArgumentError as e:
        raise UserError(f"data prepare: {e}; see `python -m nl_jax data prepare "
                        f"--help`") from None
    if unknown:
        raise UserError(f"data prepare: unknown arguments {unknown}; see `python -m nl_jax "
                        f"data prepare --help`")
    if not args.out:
        raise UserError("data prepare: --out DIR is required (the prepared folder)")
    if not args.input and not args.verify:
        raise UserError("data prepare: --input PATTERN... is required (the corpus files)")
    if args.format is not None and args.format not in FORMATS:
        raise UserError(f"data prepare: --format {args.format!r} is not one of "
                        f"{', '.join(FORMATS)}")
    for flag in ("shard_tokens", "workers"):
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number <= 0:
            raise UserError(f"data prepare: --{flag} must be a positive integer, got "
                            f"{value!r}")
        setattr(args, flag, number)
    config = None
    if spec or overrides or not args.verify:
        config = config_lib.apply_overrides(
            config_lib.load_config_file(spec or config_lib.default_config_path()), overrides)
    return args, config


def main(argv: list[str]) -> int:
    """``python -m nl_jax data prepare ...`` (see `HELP`); 0 on success."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] != "prepare":
        raise UserError(f"data: unknown subcommand {argv[0]!r}; use `data prepare` (see "
                        f"`python -m nl_jax data --help`)")
    if any(a in ("-h", "--help") for a in argv[1:]):
        print(HELP)
        return 0
    from nl_jax.config import REPO_ROOT
    args, config = _parse(argv[1:])
    out = os.path.abspath(os.path.expanduser(args.out))
    tokenizer = tok_cfg = None
    if args.input:
        manifest = prepare(args.input, out, config.data.tokenizer, base_dir=REPO_ROOT,
                           fmt=args.format, text_field=args.text_field,
                           workers=args.workers, shard_tokens=args.shard_tokens,
                           progress=not args.no_progress)
        bad = manifest["bad_records"]
        if bad:
            print(f"warning: skipped {sum(bad.values())} bad record(s) of "
                  f"{manifest['records']} ({_summary(bad)}); first: "
                  f"{'; '.join(manifest['bad_examples'][:3])}", file=sys.stderr)
        print(f"prepared {out}: {len(manifest['shards'])} shard(s), "
              f"{manifest['documents']} documents, {manifest['tokens']} tokens from "
              f"{len(manifest['inputs'])} file(s); train with "
              f"--config.data.prepared={out}")
    if args.verify:
        if config is not None:
            from nl_jax.data.tokenizer import load_tokenizer
            tok_cfg = config.data.tokenizer
            tokenizer = load_tokenizer(tok_cfg, REPO_ROOT)
        manifest = verify(out, tokenizer, tok_cfg)
        print(f"verified {out}: {len(manifest['shards'])} shard(s), {manifest['tokens']} "
              f"tokens match manifest.json")
    return 0


if __name__ == "__main__":   # python -m nl_jax.data.prepared prepare ...
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

