"""``python -m nl_jax bench mqar [--configs C,...] [--lengths L,...] [--pairs D,...]``.

Multi-query associative recall (MQAR; Arora et al., 2023, *Zoology*), generated
in-process from a seed.  A sequence of ``L`` tokens starts with ``D`` key-value
pairs ``k1 v1 ... kD vD`` (keys distinct, from ids 1 .. V/2 - 1; values from
V/2 .. V - 1); the rest of the sequence queries every key once, at even
offsets drawn without replacement from Zoology's power law (exponent 0.01:
recent and distant gaps both occur), and is filled elsewhere with random ids
of the whole vocabulary.  At a query the model must predict the key's value as
the next token; accuracy is the fraction of queries whose argmax is the value
(per query, as Zoology reports it).  Chance is about 2 / V.

MQAR is learned, so each model first trains on it: ``--steps`` AdamW steps
(the config's own levels: learning rate, warmup-cosine schedule, weight decay)
of ``--batch`` sequences of ``--train_length`` tokens, each with its ``D`` drawn
from ``--train_pairs``, cross-entropy on the query positions only.  Then
accuracy on ``--eval_examples`` fresh sequences (another seed) per (length,
pairs) cell with ``4 D <= L`` (room for the pairs and the queries), read in
one pass (Titans and Hope: the same as segment by segment, they stream
exactly; attention: full causal attention over the whole sequence).

Models (``--configs``): ``transformer``, ``titans``, ``hope`` (the tiny
configs ``nl_jax/configs/<name>/tiny.py``) or any config file, each with
``model.vocab_size`` = ``--vocab`` and the shape of ``--override KEY=VALUE``
(default: d_model 64, d_ff 192, 2 heads, as Zoology's smallest models).

Prints a table (a row per model and pairs, a column per length) and with
``--json PATH`` writes ``{"rows": [{"model", "config", "length", "pairs", "acc",
"queries"}], "train": {model: {...}}, ...}`` and a heatmap PNG beside it
(accuracy by length and pairs, a panel per model).  At the default size (a few
minutes on 2 CPU cores) accuracy is near chance for every model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nl_jax.bench.memory import int_list
from nl_jax.bench.throughput import parse_override
from nl_jax.errors import UserError

FAMILIES = {"transformer": "nl_jax/configs/transformer/tiny.py",
            "titans": "nl_jax/configs/titans/tiny.py",
            "hope": "nl_jax/configs/hope/tiny.py"}
SHAPE = (("model.d_model", "64"), ("model.d_ff", "192"), ("model.n_heads", "2"))
POWER_A = 0.01          # Zoology's power-law exponent of the query gaps


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are ``UserError`` (one ``error:`` line, exit 2)."""

    def __init__(self, bench: str, **kwargs):
        super().__init__(**kwargs)
        self.bench = bench

    def error(self, message):
        raise UserError(f"bench {self.bench}: {message}")


# -- the task ------------------------------------------------------------------------

def check_cell(length: int, pairs: int, vocab: int) -> str | None:
    """Why (``length``, ``pairs``) cannot be made with ``vocab`` ids, or None."""
    if 4 * pairs > length:
        return f"{pairs} pairs need a length of at least {4 * pairs} (pairs and queries)"
    if pairs > vocab // 2 - 1:
        return f"{pairs} distinct keys need a vocabulary of at least {2 * pairs + 2}"
    return None


def make_batch(rng: np.random.Generator, n: int, length: int, pairs, vocab: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` MQAR sequences: (inputs [n, length], targets [n, length], mask [n, length]).

    ``pairs``: an int, or one per sequence.  ``targets[i, t]`` is the value that
    must follow ``inputs[i, t]`` where ``mask[i, t]`` (a query), else 0.
    """
    counts = np.broadcast_to(np.asarray(pairs, np.int64), (n,))
    inputs = rng.integers(0, vocab, size=(n, length), dtype=np.int64)
    targets = np.zeros((n, length), np.int64)
    mask = np.zeros((n, length), bool)
    half = vocab // 2
    for i, d in enumerate(counts):
        d = int(d)
        reason = check_cell(length, d, vocab)
        if reason:
            raise UserError(f"bench mqar: {reason}")
        keys = rng.choice(np.arange(1, half), size=d, replace=False)
        values = rng.choice(np.arange(half, vocab), size=d, replace=True)
        inputs[i, 0:2 * d:2], inputs[i, 1:2 * d:2] = keys, values
        space = (length - 2 * d) // 2          # query slots at even offsets after the pairs
        p = POWER_A * np.arange(1, space + 1) ** (POWER_A - 1)
        slots = rng.choice(space, size=d, replace=False, p=p / p.sum())
        pos = 2 * d + 2 * slots
        inputs[i, pos], targets[i, pos], mask[i, pos] = keys, values, True
    return inputs.astype(np.int32), targets.astype(np.int32), mask


def accuracy(logits: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """(correct queries, queries): argmax of ``logits`` [n, L, V] vs ``targets``."""
    hits = (np.asarray(logits).argmax(-1) == targets) & mask
    return int(hits.sum()), int(mask.sum())


# -- models ----------------------------------------------------------------------------

def model_config(spec: str, overrides, *, bench: str):
    """(name, full config) of ``--configs`` entry ``spec`` (a family name or a config
    file) with ``overrides`` ((key, text) pairs) applied."""
    from nl_jax import config as config_lib
    path = FAMILIES.get(spec, spec)
    if spec not in FAMILIES and not os.path.exists(path.partition(":")[0]):
        raise UserError(f"bench {bench}: unknown config {spec!r}; use one of "
                        f"{', '.join(FAMILIES)} or a config file")
    config = config_lib.load_config_file(path)
    config = config_lib.apply_overrides(config, list(overrides))
    name = spec if spec in FAMILIES else os.path.splitext(os.path.basename(path))[0]
    return name, config


def train_and_eval(config, args, seed: int) -> dict:
    """Trains a fresh model of ``config`` on MQAR, then its accuracy per cell."""
    from flax import nnx

    from nl_jax import levels as levels_lib
    from nl_jax.models.lm import LanguageModel

    model = LanguageModel(config.model, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = levels_lib.build_levels(config.levels.to_dict(), params, total_steps=args.steps,
                                 grad_clip_norm=config.train.grad_clip_norm)

    def forward(params, inputs):
        return nnx.merge(graphdef, params, rest)(inputs)[0].astype(jnp.float32)

    def loss_fn(params, inputs, targets, mask):
        ce = optax.softmax_cross_entropy_with_integer_labels(forward(params, inputs), targets)
        return jnp.sum(jnp.where(mask, ce, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    @jax.jit
    def step(params, opt_state, inputs, targets, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    opt_state = tx.init(params)
    losses, start = [], time.perf_counter()
    for _ in range(args.steps):
        d = rng.choice(args.train_pairs, size=args.batch)
        batch = make_batch(rng, args.batch, args.train_length, d, args.vocab)
        params, opt_state, loss = step(params, opt_state, *map(jnp.asarray, batch))
        losses.append(float(loss))
    train_s = time.perf_counter() - start

    run = jax.jit(forward)
    eval_rng = np.random.default_rng(seed + 1)
    cells = []
    for length in args.lengths:
        for pairs in args.pairs:
            if check_cell(length, pairs, args.vocab):
                continue
            hits = total = 0
            for at in range(0, args.eval_examples, args.batch):
                n = min(args.batch, args.eval_examples - at)
                inputs, targets, mask = make_batch(eval_rng, args.batch, length, pairs,
                                                   args.vocab)
                h, t = accuracy(run(params, jnp.asarray(inputs))[:n], targets[:n], mask[:n])
                hits, total = hits + h, total + t
            cells.append({"length": length, "pairs": pairs, "acc": hits / total,
                          "queries": total})
    tail = max(1, args.steps // 10)
    return {"cells": cells, "losses": losses, "train_s": train_s,
            "final_train_loss": float(np.mean(losses[-tail:])),
            "num_params": int(sum(np.size(p) for p in jax.tree.leaves(params)))}


# -- the command line --------------------------------------------------------------------

def format_table(rows: list[dict], lengths) -> str:
    lines = [f"{'model':<14}{'pairs':>6}" + "".join(f"{'L=' + str(n):>9}" for n in lengths)]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for pairs in sorted({r["pairs"] for r in mine}):
            at = {r["length"]: r["acc"] for r in mine if r["pairs"] == pairs}
            lines.append(f"{model:<14}{pairs:>6}" + "".join(
                f"{at[n]:>9.3f}" if n in at else f"{'-':>9}" for n in lengths))
    return "\n".join(lines)


def check_new_outputs(path: str | None, bench: str) -> None:
    """``--json PATH`` and its PNG must not exist (never overwritten), and its folder
    must: checked before any work."""
    if path is None:
        return
    for target in (path, os.path.splitext(path)[0] + ".png"):
        if os.path.exists(target):
            raise UserError(f"bench {bench}: {target} exists and results are never "
                            f"overwritten; give a new --json path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"bench {bench}: --json {path}: folder {folder} does not exist")


def write_new(path: str, value: dict, bench: str) -> None:
    """Writes JSON at ``path``, refusing to replace a file (created meanwhile)."""
    try:
        with open(path, "x", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
    except FileExistsError:
        raise UserError(f"bench {bench}: {path} was created meanwhile and is never "
                        f"overwritten; the table is printed above") from None
    except OSError as e:
        raise UserError(f"bench {bench}: cannot write {path}: {e.strerror}") from None


def parse_args(argv: list[str]):
    parser = _Parser("mqar", prog="python -m nl_jax bench mqar",
                     description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="transformer,titans,hope",
                        help="comma-separated: transformer, titans, hope (the tiny configs) "
                             "or config files (default: all three)")
    parser.add_argument("--lengths", type=int_list, default=[64, 128, 256],
                        help="evaluation lengths in tokens (default 64,128,256)")
    parser.add_argument("--pairs", type=int_list, default=[4, 8, 16],
                        help="key-value pairs per evaluation sequence (default 4,8,16)")
    parser.add_argument("--train_length", type=int, default=64,
                        help="training sequence length (default 64)")
    parser.add_argument("--train_pairs", type=int_list, default=None,
                        help="pairs per training sequence, one drawn per sequence "
                             "(default: those of --pairs that fit --train_length)")
    parser.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (default 16)")
    parser.add_argument("--vocab", type=int, default=128,
                        help="vocabulary: keys 1..V/2-1, values V/2..V-1 (default 128)")
    parser.add_argument("--eval_examples", type=int, default=64,
                        help="evaluation sequences per (length, pairs) (default 64)")
    parser.add_argument("--override", action="append", type=parse_override, default=None,
                        metavar="KEY=VALUE",
                        help="config override for every model, repeatable (default: "
                             + " ".join(f"{k}={v}" for k, v in SHAPE) + ")")
    parser.add_argument("--seed", type=int, default=0,
                        help="model initialisation, training and evaluation sequences "
                             "(default 0)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the rows here and a heatmap PNG beside (new files)")
    args = parser.parse_args(argv)
    for flag in ("train_length", "steps", "batch", "eval_examples"):
        if getattr(args, flag) < 1:
            raise UserError(f"bench mqar: --{flag} must be a positive integer")
    if args.vocab < 8:
        raise UserError("bench mqar: --vocab must be at least 8")
    if args.train_pairs is None:
        args.train_pairs = [d for d in args.pairs
                            if not check_cell(args.train_length, d, args.vocab)]
        if not args.train_pairs:
            raise UserError(f"bench mqar: no --pairs fits --train_length "
                            f"{args.train_length}; pass --train_pairs")
    for d in args.train_pairs:
        reason = check_cell(args.train_length, d, args.vocab)
        if reason:
            raise UserError(f"bench mqar: --train_pairs {d}: {reason}")
    if all(check_cell(n, d, args.vocab) for n in args.lengths for d in args.pairs):
        raise UserError("bench mqar: no (length, pairs) cell fits; a length needs at "
                        "least 4 x pairs tokens")
    args.override = list(SHAPE) if args.override is None else args.override
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs:
        raise UserError("bench mqar: --configs names no config")
    return args


def plot(train: dict[str, dict], path: str, title: str) -> None:
    from nl_jax.eval.longcontext import plot_heatmaps
    plot_heatmaps({name: {"cells": t["cells"]} for name, t in train.items()}, path, title,
                  column="pairs", column_label="key-value pairs")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_new_outputs(args.json, "mqar")
    models = [model_config(spec, [*args.override, ("model.vocab_size", str(args.vocab))],
                           bench="mqar") for spec in args.configs]
    names = [n for n, _ in models]
    if len(set(names)) != len(names):
        raise UserError(f"bench mqar: a model is listed twice in {names}")
    rows, train = [], {}
    for (name, config), spec in zip(models, args.configs, strict=True):
        print(f"{name}: training {args.steps} steps x {args.batch} x {args.train_length} "
              f"tokens (pairs {args.train_pairs})", file=sys.stderr, flush=True)
        result = train_and_eval(config, args, args.seed)
        train[name] = {k: result[k] for k in ("final_train_loss", "train_s", "num_params",
                                              "cells", "losses")}
        rows += [{"model": name, "config": FAMILIES.get(spec, spec), **c}
                 for c in result["cells"]]
    print(f"MQAR accuracy (vocab {args.vocab}, chance ~{2 / args.vocab:.3f}; trained "
          f"{args.steps} steps at length {args.train_length}, pairs {args.train_pairs}; "
          f"device {jax.devices()[0].platform})")
    print(format_table(rows, args.lengths))
    for name, t in train.items():
        print(f"{name}: {t['num_params']:,} params, final train loss "
              f"{t['final_train_loss']:.3f}, trained in {t['train_s']:.0f} s")
    if args.json:
        out = {"rows": rows, "train": train, "lengths": args.lengths, "pairs": args.pairs,
               "train_length": args.train_length, "train_pairs": args.train_pairs,
               "steps": args.steps, "batch": args.batch, "vocab": args.vocab,
               "eval_examples": args.eval_examples, "seed": args.seed,
               "overrides": [f"{k}={v}" for k, v in args.override],
               "device": jax.devices()[0].platform,
               "date": datetime.date.today().isoformat()}
        write_new(args.json, out, "mqar")
        png = os.path.splitext(args.json)[0] + ".png"
        plot(train, png, f"MQAR accuracy after {args.steps} training steps")
        print(f"wrote {args.json} and {png}")
    return 0
