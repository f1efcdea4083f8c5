"""``python -m nl_jax bench optimizers [--json PATH] [--steps N] [--text FILE]``.

Trains the same tiny byte-level LM (vocab 256, d_model 64, 2 layers, 64
tokens x 8 sequences per step) with each optimizer config of
``nl_jax/configs/optimizers`` (AdamW, Muon, M3, delta momentum, DMGD) on the
same token stream and the same token budget, on whatever device JAX has.
Reports the final training loss (mean over the last 10% of steps), the
median step time after compilation and its overhead against AdamW; with
``--json`` writes ``{"rows": [...]}`` and a PNG of the loss curves next to it.

Tokens are the bytes of the first ``--max_bytes`` of the text (default: the
files of ``nl_jax/configs/base.py``'s ``data.train_files``, relative to the
folder that holds the nl_jax package), so the benchmark needs no tokenizer.
"""

from __future__ import annotations

import argparse
import importlib

import jax
import numpy as np

from nl_jax.bench import tiny_lm
from nl_jax.errors import DataError

OPTIMIZER_CONFIGS = ("adamw", "muon", "m3", "delta_momentum", "dmgd")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m nl_jax bench optimizers")
    parser.add_argument("--json", default=None, help="write the rows here (and a PNG beside)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--text", default=None,
                        help="text file for byte tokens (default: base data.train_files)")
    parser.add_argument("--max_bytes", type=int, default=200_000)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZER_CONFIGS),
                        help=f"comma-separated subset of {','.join(OPTIMIZER_CONFIGS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 2:
        raise DataError("bench optimizers: --steps must be >= 2")
    names = [n for n in args.optimizers.split(",") if n]
    unknown = sorted(set(names) - set(OPTIMIZER_CONFIGS))
    if unknown:
        raise DataError(f"bench optimizers: unknown optimizer(s) {unknown}; choose from "
                        f"{list(OPTIMIZER_CONFIGS)}")
    paths = [args.text] if args.text else tiny_lm.default_text_files()
    if not paths:
        raise DataError("bench optimizers: no text found at base data.train_files; "
                        "pass --text FILE")

    model_cfg = tiny_lm.tiny_model_config()
    tokens = tiny_lm.byte_tokens(paths, args.max_bytes, "optimizers")
    data = tiny_lm.batches(tokens, args.steps, batch=tiny_lm.BATCH, seq_len=tiny_lm.SEQ_LEN,
                           seed=args.seed)
    curves, rows = {}, []
    for name in names:
        module = importlib.import_module(f"nl_jax.configs.optimizers.{name}")
        levels_cfg = module.get_config().levels
        run = tiny_lm.train_curve(levels_cfg, model_cfg, data, args.seed)
        losses, step_ms = run["losses"], run["step_ms"]
        tail = max(1, len(losses) // 10)
        curves[name] = losses
        rows.append({"optimizer": name, "final_loss": float(np.mean(losses[-tail:])),
                     "step_ms": step_ms})
    base_ms = next((r["step_ms"] for r in rows if r["optimizer"] == "adamw"), None)
    print(f"{args.steps} steps x {tiny_lm.BATCH} x {tiny_lm.SEQ_LEN} bytes, "
          f"device {jax.devices()[0].platform}")
    print(f"{'optimizer':<16}{'final_loss':>12}{'step_ms':>10}{'vs adamw':>10}")
    for r in rows:
        overhead = f"{100 * (r['step_ms'] / base_ms - 1):+.0f}%" if base_ms else "-"
        print(f"{r['optimizer']:<16}{r['final_loss']:>12.4f}{r['step_ms']:>10.2f}"
              f"{overhead:>10}")
    if args.json:
        tiny_lm.write_results(args.json, rows, curves, "bench optimizers: tiny byte-level LM")
    return 0
