"""Text corpora -> token cache -> grain datasets of fixed-length windows.

Corpus.  Either the files data.train_files matches, tokenized through the
token cache (``token_cache.py``), or, when data.prepared names a folder made
by ``python -m nl_jax data prepare``, that folder's shards, read with grain's
``ArrayRecordDataSource`` (``prepared.py``: startup reads its manifest only,
O(shards)); its manifest's tokenizer must be data.tokenizer.  Both give one
token array (documents in order, each followed by eos) and the same windows,
stream and batches from it: plain-text files prepared with the same tokenizer
give exactly the batches of data.train_files.  Evaluation reads
data.eval_files (text files) either way.

Windows.  The corpus is one token array (documents in order, each followed by
eos).  Window ``w`` is ``tokens[w*L : w*L + L + 1]`` for ``L = seq_len``:
``inputs`` are its first L tokens, ``targets`` its last L, so consecutive
windows share one token and every token but the first is a target at most
once per epoch.  A corpus of N tokens has ``(N - 1) // L`` windows; the last
``(N - 1) mod L`` tokens fill no window and are never targets.  When the
number of windows is not a multiple of the batch size, a batch that spans
an epoch boundary may hold the same window twice (once from each epoch).

Training stream.  Global batch ``i`` holds the window ids
``stream[i*B : (i+1)*B]`` (``B = data.batch_size``), where ``stream`` is the
infinite concatenation of per-epoch permutations of all window ids (grain's
index shuffle, reseeded each epoch from the run seed); batches run across
epoch boundaries.  Process ``p`` of ``P`` gets rows ``p*B/P : (p+1)*B/P`` of
every global batch, so the processes' rows are disjoint and together are
the one-process batch.  The iterator state is the global batch index, the
same on every process and independent of ``P``.

Evaluation.  ``num_batches`` global batches of windows spread evenly over
the held-out corpus, in corpus order; no shuffling.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from nl_jax.data import prepared as prepared_lib
from nl_jax.data import text_files, token_cache
from nl_jax.errors import ConfigError, DataError

log = logging.getLogger("nl_jax")

_MISSING = object()


def _cfg_value(cfg, key: str, default: Any = _MISSING) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is _MISSING:
        raise ConfigError(f"config key data.{key} is missing")
    return default


def _positive_int(cfg, key: str) -> int:
    value = _cfg_value(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"config key data.{key} must be a positive integer, got {value!r}")
    return int(value)


def local_batch_size(batch_size: int, process_count: int) -> int:
    """Rows per process; the global batch must split evenly."""
    if process_count <= 0:
        raise ConfigError(f"process_count must be positive, got {process_count}")
    if batch_size % process_count:
        raise ConfigError(f"config key data.batch_size={batch_size} must be divisible by "
                          f"the number of processes ({process_count}); use a multiple "
                          f"of {process_count}")
    return batch_size // process_count


def resolve_cache_dir(data_cfg, base_dir: str) -> str | None:
    """Absolute token-cache folder, or None when data.cache_dir is empty."""
    cache_dir = _cfg_value(data_cfg, "cache_dir", None)
    if not cache_dir:
        return None
    cache_dir = os.path.expanduser(str(cache_dir))
    return cache_dir if os.path.isabs(cache_dir) else os.path.join(base_dir, cache_dir)


def resolve_prepared_dir(data_cfg, base_dir: str) -> str | None:
    """Absolute data.prepared folder, or None when data.prepared is empty (or absent)."""
    folder = _cfg_value(data_cfg, "prepared", None)
    if not folder:
        return None
    if not isinstance(folder, str):
        raise ConfigError(f"config key data.prepared must be a folder path (a string), got "
                          f"{folder!r}")
    folder = os.path.expanduser(folder)
    return folder if os.path.isabs(folder) else os.path.join(base_dir, folder)


def open_prepared(data_cfg, tokenizer, *, base_dir: str) -> prepared_lib.PreparedCorpus | None:
    """The data.prepared corpus (manifest checked against the tokenizer), or None."""
    folder = resolve_prepared_dir(data_cfg, base_dir)
    if folder is None:
        return None
    return prepared_lib.open_corpus(folder, tokenizer, _cfg_value(data_cfg, "tokenizer"))


def corpus_tokens(patterns, tokenizer, *, base_dir: str, cache_dir: str | None,
                  key: str) -> token_cache.TokenCache:
    """Tokens of the files the patterns (config key `key`) match, via the cache."""
    files = text_files.resolve_files(patterns, base_dir, key=key)
    return token_cache.load_or_build(files, tokenizer, cache_dir)


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens, overlapping by one, in `num_tokens` tokens."""
    return max(num_tokens - 1, 0) // seq_len


def _require_windows(num_tokens: int, seq_len: int, needed: int, source: str) -> int:
    """Windows in `num_tokens` tokens; a DataError naming `source` (the config key
    and its value) when they fill fewer than `needed`."""
    available = num_windows(num_tokens, seq_len)
    if available < needed:
        raise DataError(
            f"{source} gives {num_tokens} tokens, but one batch of {needed} windows of "
            f"seq_len={seq_len} needs {needed * seq_len + 1}; add text or lower "
            f"data.seq_len / data.batch_size")
    return available


def _files_source(key: str, patterns) -> str:
    return f"{key} {list(text_files.as_patterns(patterns))}"


def gather_windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int
                   ) -> dict[str, np.ndarray]:
    """{"inputs", "targets"}: int32 [len(window_ids), seq_len] (see module doc).

    `tokens`: anything indexed like a 1-D numpy array by an integer array (a
    memmap, ``token_cache.VerifiedTokens``, ``prepared.PreparedTokens``).
    """
    starts = np.asarray(window_ids, dtype=np.int64)[:, None] * seq_len
    windows = np.asarray(tokens[starts + np.arange(seq_len + 1)], dtype=np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def shuffle_seed(seed: int) -> int:
    """32-bit shuffle seed derived by hashing the run seed.

    grain reseeds epoch e with (seed + e); hashing keeps run seeds s and s+1
    from sharing all but one epoch's order.
    """
    digest = hashlib.sha256(f"nl_jax.data.train_stream:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def window_id_stream(num_window_ids: int, seed: int) -> grain.MapDataset:
    """Infinite MapDataset of window ids: one fresh permutation per epoch."""
    return (grain.MapDataset.range(num_window_ids)
            .shuffle(seed=shuffle_seed(seed))
            .repeat(None))


def train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """MapDataset whose element i is this process's rows of global batch i."""
    local = local_batch_size(batch_size, process_count)
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is outside [0, {process_count})")
    rows = slice(process_index * local, (process_index + 1) * local)
    total = num_windows(int(tokens.size), seq_len)

    def local_batch(window_ids: np.ndarray) -> dict[str, np.ndarray]:
        return gather_windows(tokens, np.asarray(window_ids)[rows], seq_len)

    return (window_id_stream(total, seed)
            .batch(batch_size, drop_remainder=True)
            .map(local_batch))


class TrainBatchIterator:
    """Iterator over local training batches with a JSON-serialisable state.

    ``get_state()`` -> {"next_index", "seed", "corpus_key", "seq_len",
    "batch_size"}; ``set_state`` restores it exactly (the next batch is the
    one that followed when the state was taken) and refuses a state from a
    different corpus, seed or batch geometry.
    """

    def __init__(self, dataset: grain.MapDataset, *, seed: int, corpus_key: str,
                 seq_len: int, batch_size: int, num_tokens: int):
        self._dataset = dataset
        self._iter = dataset.to_iter_dataset(
            grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)).__iter__()
        self._identity = {"seed": int(seed), "corpus_key": corpus_key,
                          "seq_len": int(seq_len), "batch_size": int(batch_size)}
        self.num_tokens = num_tokens
        self.file_hashes: dict[str, str] = {}   # training file -> SHA-256, set by the builder
        self.num_windows = num_windows(num_tokens, seq_len)

    def __iter__(self) -> TrainBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        return {"next_index": int(self._iter.get_state()["next_index"]), **self._identity}

    def set_state(self, state: dict[str, Any]) -> None:
        if "next_index" not in state:
            raise DataError(f"data iterator state {state!r} has no next_index; the "
                            f"checkpoint's data state is damaged")
        missing = sorted(set(self._identity) - set(state))
        if missing:
            raise DataError(f"data iterator state {state!r} lacks {missing}; the "
                            f"checkpoint's data state is damaged")
        what = {"corpus_key": "corpus_key (hash of the tokenizer and training files)"}
        changed = [f"{what.get(k, k)} (checkpoint: {state[k]!r}, now: {v!r})"
                   for k, v in self._identity.items() if state[k] != v]
        if changed:
            raise DataError(
                f"the training data stream differs from the checkpoint's in "
                f"{'; '.join(changed)}; restore the training files and settings it was "
                f"made with, or start a new workdir")
        self._iter.set_state({"next_index": int(state["next_index"])})


def build_train_iterator(data_cfg, tokenizer, *, seed: int, base_dir: str,
                         process_index: int = 0, process_count: int = 1
                         ) -> TrainBatchIterator:
    """Infinite iterator of {"inputs", "targets"}: int32 [batch_size // P, seq_len].

    Deterministic given `seed` and the corpus; see the module doc for the
    window, shuffle and sharding contract.
    """
    seq_len = _positive_int(data_cfg, "seq_len")
    batch_size = _positive_int(data_cfg, "batch_size")
    local_batch_size(batch_size, process_count)
    corpus = open_prepared(data_cfg, tokenizer, base_dir=base_dir)
    if corpus is not None:
        log.info("training on the prepared shards in %s (%d shards, %d tokens; "
                 "data.train_files is not read)", corpus.folder,
                 len(corpus.manifest["shards"]), corpus.tokens.size)
        tokens, identity, hashes = corpus.tokens, corpus.identity, corpus.file_hashes
        source = f"data.prepared {corpus.folder}"
    else:
        patterns = _cfg_value(data_cfg, "train_files")
        cache = corpus_tokens(patterns, tokenizer, base_dir=base_dir,
                              cache_dir=resolve_cache_dir(data_cfg, base_dir),
                              key="data.train_files")
        tokens, identity = cache.tokens, cache.identity
        hashes = dict(zip(cache.files, cache.file_hashes, strict=True))
        source = _files_source("data.train_files", patterns)
    _require_windows(int(tokens.size), seq_len, batch_size, source)
    dataset = train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed,
                            process_index=process_index, process_count=process_count)
    iterator = TrainBatchIterator(dataset, seed=seed, corpus_key=identity,
                                  seq_len=seq_len, batch_size=batch_size,
                                  num_tokens=int(tokens.size))
    iterator.file_hashes = hashes
    return iterator


def eval_window_ids(total_windows: int, count: int) -> np.ndarray:
    """`count` distinct window ids spread evenly over [0, total_windows), ascending."""
    return (np.arange(count, dtype=np.int64) * total_windows) // count


def build_eval_batches(data_cfg, tokenizer, *, base_dir: str, num_batches: int,
                       files: Sequence[str] | None = None, process_index: int = 0,
                       process_count: int = 1, train_hashes: dict[str, str] | None = None
                       ) -> list[dict[str, np.ndarray]]:
    """Held-out batches from data.eval_files (or `files`), the same on every call.

    Gives min(num_batches, windows // batch_size) global batches of windows
    spread evenly over the corpus; each process keeps its rows, as in training.
    ``train_hashes`` ({training file: SHA-256}) turns on a warning for held-out
    files whose bytes are also a training file (the loss would not be held out).
    """
    seq_len = _positive_int(data_cfg, "seq_len")
    batch_size = _positive_int(data_cfg, "batch_size")
    local = local_batch_size(batch_size, process_count)
    if num_batches <= 0:
        raise ConfigError(f"num_batches must be positive, got {num_batches}")
    key = "--files" if files is not None else "data.eval_files"
    patterns = files if files is not None else _cfg_value(data_cfg, "eval_files")
    cache = corpus_tokens(patterns, tokenizer, base_dir=base_dir,
                          cache_dir=resolve_cache_dir(data_cfg, base_dir), key=key)
    total = _require_windows(int(cache.tokens.size), seq_len, batch_size,
                             _files_source(key, patterns))
    if train_hashes:
        by_hash = {h: f for f, h in train_hashes.items()}
        shared = [(f, by_hash[h]) for f, h in zip(cache.files, cache.file_hashes, strict=True)
                  if h in by_hash]
        if shared:
            log.warning("%s: %d held-out file(s) are byte-identical to training files, so "
                        "the evaluation is not held out: %s", key, len(shared),
                        "; ".join(f"{e} == {t}" for e, t in shared[:3]))
    count = min(num_batches, total // batch_size)
    if count < num_batches:
        log.warning("%s has windows for %d evaluation batches, not %d; using %d",
                    key, count, num_batches, count)
    ids = eval_window_ids(total, count * batch_size).reshape(count, batch_size)
    rows = slice(process_index * local, (process_index + 1) * local)
    return [gather_windows(cache.tokens, batch_ids[rows], seq_len) for batch_ids in ids]


def token_count_summary(data_cfg, tokenizer, *, base_dir: str) -> dict[str, dict[str, Any]]:
    """Files, tokens, windows and batches per epoch of the train and eval corpora
    (the train corpus from data.prepared when set: its input files, from the
    manifest)."""
    seq_len = _positive_int(data_cfg, "seq_len")
    batch_size = _positive_int(data_cfg, "batch_size")
    cache_dir = resolve_cache_dir(data_cfg, base_dir)
    summary = {}
    corpus = open_prepared(data_cfg, tokenizer, base_dir=base_dir)
    for name in ("train_files", "eval_files"):
        if name == "train_files" and corpus is not None:
            files, tokens = len(corpus.manifest["inputs"]), int(corpus.tokens.size)
        else:
            patterns = _cfg_value(data_cfg, name, None)
            if not patterns:
                continue
            cache = corpus_tokens(patterns, tokenizer, base_dir=base_dir,
                                  cache_dir=cache_dir, key=f"data.{name}")
            files, tokens = len(cache.files), int(cache.tokens.size)
        windows = num_windows(tokens, seq_len)
        summary[name.split("_")[0]] = {
            "files": files, "tokens": tokens,
            "windows": windows, "batches_per_epoch": windows // batch_size}
    return summary
