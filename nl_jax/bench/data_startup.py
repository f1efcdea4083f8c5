"""``python -m nl_jax bench data_startup [--copies 100] [--json PATH]``: training
startup on a large corpus, prepared shards vs the text-file path.

The corpus is ``--copies`` copies of the bundled training corpus
(``nl_jax/data/assets/corpus/train/*.txt``, 4 books, 1.5 MB, 0.49M tokens),
each file headed by a line naming its copy so no two files are equal, written
to ``--workdir`` (default: a temporary folder, removed afterwards).  With the
base config's data settings (bundled BPE, seq_len 128, batch 16), times in one
process (the libraries imported before the first timing):

* ``prepare_s``: ``data prepare`` of the corpus (``--workers``, default one a
  core; default ``--shard_tokens``), for reference;
* ``text_cold_s``: startup on data.train_files with an empty token cache:
  the cache is built (every file read, hashed and tokenized) -- a first launch
  today, and every launch on a host without the cache;
* ``text_warm_s``: the same with the cache built: every file is still
  SHA-256-hashed to find the entry (O(corpus bytes)), then memory-mapped;
* ``prepared_s``: startup on data.prepared: the manifest is read (O(shards)),
  and the first batch opens and checksums the shards it touches.

Startup = ``pipeline.build_train_iterator`` (tokenizer already loaded) and
``next`` of it (the first batch).  Warm and prepared: the best of
``--repeats`` (the page cache holds the files after the first).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import tempfile
import time

import ml_collections


def _corpus(folder: str, copies: int) -> tuple[list[str], int]:
    from nl_jax.config import REPO_ROOT
    sources = sorted(glob.glob(os.path.join(REPO_ROOT, "nl_jax", "data", "assets", "corpus",
                                            "train", "*.txt")))
    os.makedirs(folder, exist_ok=True)
    total = 0
    for copy in range(copies):
        for src in sources:
            with open(src, "rb") as f:
                data = f"[copy {copy}]\n".encode() + f.read()
            path = os.path.join(folder, f"{copy:04d}-{os.path.basename(src)}")
            with open(path, "wb") as f:
                f.write(data)
            total += len(data)
    return sorted(glob.glob(os.path.join(folder, "*.txt"))), total


def _startup(data_cfg, tokenizer) -> float:
    from nl_jax.config import REPO_ROOT
    from nl_jax.data import pipeline
    t = time.perf_counter()
    it = pipeline.build_train_iterator(data_cfg, tokenizer, seed=0, base_dir=REPO_ROOT)
    next(it)
    return time.perf_counter() - t


def measure(workdir: str, copies: int, repeats: int, workers: int | None,
            shard_tokens: int) -> dict:
    from nl_jax.config import REPO_ROOT
    from nl_jax.configs import base
    from nl_jax.data import pipeline, prepared  # noqa: F401 (imports grain before timing)
    from nl_jax.data.tokenizer import load_tokenizer

    files, text_bytes = _corpus(os.path.join(workdir, "corpus"), copies)
    data = base.get_config().data
    tokenizer = load_tokenizer(data.tokenizer, REPO_ROOT)
    out = os.path.join(workdir, "prepared")
    t = time.perf_counter()
    manifest = prepared.prepare([os.path.join(workdir, "corpus", "*.txt")], out,
                                data.tokenizer, base_dir=REPO_ROOT, workers=workers,
                                shard_tokens=shard_tokens, progress=False)
    prepare_s = time.perf_counter() - t

    def cfg(prepared_dir: str) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict(data.to_dict())
        c.train_files = (os.path.join(workdir, "corpus", "*.txt"),)
        c.cache_dir = os.path.join(workdir, "cache")
        c.prepared = prepared_dir
        return c

    text_cold = _startup(cfg(""), tokenizer)
    text_warm = min(_startup(cfg(""), tokenizer) for _ in range(repeats))
    prep = min(_startup(cfg(out), tokenizer) for _ in range(repeats))
    return {"copies": copies, "files": len(files), "text_bytes": text_bytes,
            "tokens": manifest["tokens"], "shards": len(manifest["shards"]),
            "shard_tokens": shard_tokens, "workers": workers or len(os.sched_getaffinity(0)),
            "prepare_s": prepare_s, "text_cold_s": text_cold, "text_warm_s": text_warm,
            "prepared_s": prep, "seq_len": data.seq_len, "batch_size": data.batch_size}


def main(argv: list[str]) -> int:
    from nl_jax.data.prepared import DEFAULT_SHARD_TOKENS
    ap = argparse.ArgumentParser(prog="nl_jax bench data_startup", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=100,
                    help="copies of the bundled training corpus (default 100)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None,
                    help="data prepare's tokenizer processes (default: one a core)")
    ap.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--workdir", default=None, help="keep the corpus and outputs here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="nl_jax_bench_data_")
    try:
        row = measure(workdir, args.copies, args.repeats, args.workers, args.shard_tokens)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"corpus: {row['copies']} x the bundled training corpus = {row['files']} files, "
          f"{row['text_bytes'] / 1e6:.0f} MB, {row['tokens'] / 1e6:.1f}M tokens; "
          f"{row['shards']} shard(s)")
    print(f"{'startup (build iterator + first batch)':<42} {'seconds':>8}")
    for name, key in (("text path, empty token cache", "text_cold_s"),
                      ("text path, token cache built", "text_warm_s"),
                      ("prepared shards (data.prepared)", "prepared_s"),
                      (f"(data prepare itself, {row['workers']} workers)", "prepare_s")):
        print(f"{name:<42} {row[key]:>8.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": [row], "machine": platform.node(), "cpus": os.cpu_count(),
                       "date": datetime.date.today().isoformat(),
                       "load_average": os.getloadavg()[0]}, f, indent=2)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
