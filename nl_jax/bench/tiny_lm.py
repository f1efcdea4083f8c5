"""The tiny byte-level LM shared by ``bench optimizers`` and ``bench schedules``.

Tokens are the bytes of the bundled training text (vocab 256, so no
tokenizer); every configuration compared in one run sees the same windows.
"""

from __future__ import annotations

import glob
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nl_jax.config import REPO_ROOT  # relative data paths of a config start here
from nl_jax.configs import base
from nl_jax.errors import DataError

BATCH, SEQ_LEN = 8, 64
MIN_BYTES = 10_000


def default_text_files(key: str = "train_files") -> list[str]:
    """The files of the base config's ``data.<key>`` (``nl_jax/configs/base.py``),
    relative to the folder that holds the nl_jax package (found installed too)."""
    files = []
    for pattern in base.get_config().data[key]:
        files += sorted(glob.glob(os.path.join(REPO_ROOT, pattern)))
    return files


def byte_tokens(paths: list[str], max_bytes: int, bench: str) -> np.ndarray:
    """The first ``max_bytes`` bytes of the concatenated files as int32 tokens."""
    if max_bytes < MIN_BYTES:
        raise DataError(f"bench {bench}: --max_bytes {max_bytes} is below the {MIN_BYTES} "
                        f"bytes of text the benchmark needs")
    data = b""
    for path in paths:
        try:
            with open(path, "rb") as f:
                data += f.read(max_bytes - len(data))
        except OSError as e:
            raise DataError(f"bench {bench}: cannot read text file {path}: {e}") from None
        if len(data) >= max_bytes:
            break
    if len(data) < MIN_BYTES:
        raise DataError(f"bench {bench}: {paths} hold {len(data)} bytes; the benchmark "
                        f"needs at least {MIN_BYTES} (pass a larger --text FILE)")
    return np.frombuffer(data, np.uint8).astype(np.int32)


def batches(tokens: np.ndarray, steps: int, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[steps, batch, seq_len + 1] random windows; identical for every configuration."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=(steps, batch))
    return tokens[starts[..., None] + np.arange(seq_len + 1)]


def tiny_model_config():
    """Transformer++ of ``nl_jax/configs/base.py`` shrunk to d_model 64, 2 layers, vocab 256."""
    m = base.get_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 256, 64, 2, 4, 192
    return m


def train_curve(levels_cfg, model_cfg, data: np.ndarray, seed: int,
                eval_sets: dict[str, np.ndarray] | None = None,
                eval_steps: tuple[int, ...] = ()) -> dict:
    """Trains a fresh model on ``data`` (one window batch per step).

    Returns ``losses`` (per step), ``step_ms`` (median after the first,
    compiling, step), ``num_params`` and ``evals``: after each step in
    ``eval_steps`` and after the last one, ``{step: {name: loss}}``, the mean
    next-byte loss on each of ``eval_sets`` (arrays of window batches).
    """
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

    eval_loss = jax.jit(loss_fn)

    def evaluate(params):
        return {name: float(np.mean([eval_loss(params, jnp.asarray(w)) for w in windows]))
                for name, windows in (eval_sets or {}).items()}

    opt_state = tx.init(params)
    losses, times, evals = [], [], {}
    for i, window in enumerate(data, start=1):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, jnp.asarray(window))
        losses.append(float(loss))   # blocks until the step is done
        times.append(time.perf_counter() - start)
        if eval_sets and (i in eval_steps or i == len(data)):
            evals[i] = evaluate(params)
    return {"losses": np.asarray(losses), "step_ms": 1e3 * float(np.median(times[1:])),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params))),
            "evals": evals}


def plot_curves(curves: dict[str, np.ndarray], path: str, title: str) -> None:
    """Loss curves, one line per configuration, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(np.arange(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(path: str, rows: list[dict], curves: dict[str, np.ndarray],
                  title: str) -> None:
    """``{"rows": rows}`` as JSON at ``path`` and the loss curves as a PNG beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    png = os.path.splitext(path)[0] + ".png"
    plot_curves(curves, png, title)
    print(f"wrote {path} and {png}")
