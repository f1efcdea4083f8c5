"""``python -m nl_jax bench checkpoint [--json PATH]``: what integrity costs a checkpoint.

For train states of ``--params`` million parameters (float32 weights plus
AdamW's two moments, in ``--leaves`` arrays each), times in one process:

* ``checksum_ms``: the integrity record's array checksums
  (``train/integrity.py``; compiled once per state structure, the compile is
  reported separately) -- the only work integrity adds to a save, and
  again to a restore (where it verifies);
* ``save_ms``: ``Checkpointer.save`` until the async write is finished;
* ``restore_ms``: ``Checkpointer.restore`` of the whole state, verification
  included.

The share of checksum time in the save and restore times is what integrity
adds.  Median of ``--repeats``.  Prints a table; ``--json PATH`` writes the
rows with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time


def _state(n_params: int, leaves: int):
    import jax
    per = max(n_params // leaves, 1)
    keys = jax.random.split(jax.random.key(0), 3 * leaves)
    arrays = [jax.random.normal(k, (per,)) for k in keys]
    return {"params": arrays[:leaves], "mu": arrays[leaves:2 * leaves],
            "nu": arrays[2 * leaves:]}


def measure(n_params: int, leaves: int, repeats: int) -> dict:
    import jax

    from nl_jax.train import checkpoint as ckpt_lib
    from nl_jax.train import integrity
    state = jax.block_until_ready(_state(n_params, leaves))
    t0 = time.perf_counter()
    integrity.array_checksums(state)
    first_ms = 1e3 * (time.perf_counter() - t0)
    checksum, save, restore = [], [], []
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=x.sharding), state)
    with tempfile.TemporaryDirectory() as workdir:
        checkpointer = ckpt_lib.Checkpointer(workdir, repeats + 1, {"bench": True})
        for step in range(1, repeats + 1):
            t0 = time.perf_counter()
            integrity.array_checksums(state)
            checksum.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpointer.save(step, state, {"position": step})
            checkpointer.wait()
            save.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(checkpointer.restore(step, abstract))
            restore.append(time.perf_counter() - t0)
        checkpointer.close()
    median_ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    row = dict(params=n_params, state_mib=ckpt_lib.tree_bytes(state) / 2**20,
               checksum_ms=median_ms(checksum), checksum_compile_ms=first_ms,
               save_ms=median_ms(save), restore_ms=median_ms(restore))
    row["save_share"] = row["checksum_ms"] / row["save_ms"]
    row["restore_share"] = row["checksum_ms"] / row["restore_ms"]
    return row


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="nl_jax bench checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="1,12,50",
                    help="comma-separated sizes in millions of parameters")
    ap.add_argument("--leaves", type=int, default=40, help="arrays per part of the state")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = [int(float(s) * 1e6) for s in args.params.split(",") if s]
    rows = [measure(n, args.leaves, args.repeats) for n in sizes]
    print(f"{'params':>12} {'state MiB':>10} {'checksum ms':>12} {'(compile)':>10} "
          f"{'save ms':>9} {'restore ms':>11} {'of save':>8} {'of restore':>11}")
    for r in rows:
        print(f"{r['params']:>12,} {r['state_mib']:>10.0f} {r['checksum_ms']:>12.1f} "
              f"{r['checksum_compile_ms']:>10.0f} {r['save_ms']:>9.0f} {r['restore_ms']:>11.0f} "
              f"{100 * r['save_share']:>7.1f}% {100 * r['restore_share']:>10.1f}%")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "machine": platform.node(), "cpus": os.cpu_count(),
                       "date": datetime.date.today().isoformat(),
                       "load_average": os.getloadavg()[0]}, f, indent=2)
    return 0
