"""``python -m nl_jax bench optimizers [--json PATH] [--steps N] [--text FILE]``.

Trains the same tiny byte-level LM (vocab 256, d_model 64, 2 layers, 64
tokens x 8 sequences per step) with each optimizer config of
``experiments/optimizers`` (AdamW, Muon, M3, delta momentum, DMGD) on the
same token stream and the same token budget, on whatever device JAX has.
Reports the final training loss (mean over the last 10% of steps), the
median step time after compilation and its overhead against AdamW; with
``--json`` writes ``{"rows": [...]}`` and a PNG of the loss curves next to it.

Tokens are the bytes of the first ``--max_bytes`` of the text (default: the
files of ``experiments/base.py``'s ``data.train_files``, relative to the
repository), so the benchmark needs no tokenizer.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nl_jax.errors import DataError

OPTIMIZER_CONFIGS = ("adamw", "muon", "m3", "delta_momentum", "dmgd")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # the configs live in the repository's experiments/


def default_text_files() -> list[str]:
    from experiments import base
    files = []
    for pattern in base.get_config().data.train_files:
        files += sorted(glob.glob(os.path.join(REPO_ROOT, pattern)))
    return files


def byte_tokens(paths: list[str], max_bytes: int) -> np.ndarray:
    """The first ``max_bytes`` bytes of the concatenated files as int32 tokens."""
    data = b""
    for path in paths:
        try:
            with open(path, "rb") as f:
                data += f.read(max_bytes - len(data))
        except OSError as e:
            raise DataError(f"bench optimizers: cannot read --text {path}: {e}") from None
        if len(data) >= max_bytes:
            break
    if len(data) < 10_000:
        raise DataError(f"bench optimizers: {paths} hold {len(data)} bytes; the benchmark "
                        f"needs at least 10000 (pass a larger --text FILE)")
    return np.frombuffer(data, np.uint8).astype(np.int32)


def batches(tokens: np.ndarray, steps: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[steps, batch, seq_len + 1] random windows; identical for every optimizer."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=(steps, batch))
    return tokens[starts[..., None] + np.arange(seq_len + 1)]


def tiny_model_config():
    from experiments import base
    m = base.get_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 256, 64, 2, 4, 192
    return m


def train_curve(levels_cfg, model_cfg, data: np.ndarray, seed: int
                ) -> tuple[np.ndarray, float]:
    """(per-step losses, median step time in ms after the first step)."""
    from nl_jax import levels as levels_lib
    from nl_jax.models.lm import LanguageModel

    model = LanguageModel(model_cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = levels_lib.build_levels(levels_cfg, params, total_steps=len(data),
                                 grad_clip_norm=1.0)

    def loss_fn(params, window):
        logits, _ = nnx.merge(graphdef, params, rest)(window[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), window[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, window):
        loss, grads = jax.value_and_grad(loss_fn)(params, window)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses, times = [], []
    for window in data:
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, jnp.asarray(window))
        losses.append(float(loss))   # blocks until the step is done
        times.append(time.perf_counter() - start)
    return np.asarray(losses), 1e3 * float(np.median(times[1:]))


def plot_curves(curves: dict[str, np.ndarray], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title("bench optimizers: tiny byte-level LM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    paths = [args.text] if args.text else default_text_files()
    if not paths:
        raise DataError("bench optimizers: no text found at base data.train_files; "
                        "pass --text FILE")

    model_cfg = tiny_model_config()
    data = batches(byte_tokens(paths, args.max_bytes), args.steps, batch=8, seq_len=64,
                   seed=args.seed)
    curves, rows = {}, []
    for name in names:
        levels_cfg = importlib.import_module(f"experiments.optimizers.{name}").get_config().levels
        losses, step_ms = train_curve(levels_cfg, model_cfg, data, args.seed)
        tail = max(1, len(losses) // 10)
        curves[name] = losses
        rows.append({"optimizer": name, "final_loss": float(np.mean(losses[-tail:])),
                     "step_ms": step_ms})
    base_ms = next((r["step_ms"] for r in rows if r["optimizer"] == "adamw"), None)
    print(f"{args.steps} steps x 8 x 64 bytes, device {jax.devices()[0].platform}")
    print(f"{'optimizer':<16}{'final_loss':>12}{'step_ms':>10}{'vs adamw':>10}")
    for r in rows:
        overhead = f"{100 * (r['step_ms'] / base_ms - 1):+.0f}%" if base_ms else "-"
        print(f"{r['optimizer']:<16}{r['final_loss']:>12.4f}{r['step_ms']:>10.2f}"
              f"{overhead:>10}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
        png = os.path.splitext(args.json)[0] + ".png"
        plot_curves(curves, png)
        print(f"wrote {args.json} and {png}")
    return 0
