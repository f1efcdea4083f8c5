"""``python -m nl_jax bench forgetting [--configs C,...] [--json PATH]``: continual learning.

Each model trains on a sequence of distinct domains, one stage per domain
(default: the four bundled training novels, one author each: Carroll, Stevenson,
Conan Doyle, Shelley, in that order), ``--steps_per_stage`` steps each, with
one optimizer and one learning-rate schedule over the whole sequence (the
config's levels).  After every stage it measures the held-out loss on every
domain: the last ``--heldout_fraction`` of each domain's tokens, never trained
on, read in windows of ``--seq_len`` tokens (in-context levels adapting within
each window, as in training).  ``matrix[i][j]`` is the loss on domain ``j``
after stage ``i``; entries ``j > i`` (domains not trained on yet) are measured
too and used by no metric.

Metrics (``forgetting_per_domain``, ``average_forgetting``, ``final_average_loss``,
shared with ``bench schedules --shift``): with ``T`` stages,

    forgetting_j = L[T-1][j] - min_{j <= l <= T-2} L[l][j]        (j < T-1)

the final loss on domain ``j`` minus the lowest loss it had after it was trained
on and before the last stage: Chaudhry et al. (2018, "Riemannian Walk")'s
forgetting, max_l a[l][j] - a[T-1][j] on accuracies, written for losses (lower is
better).  Positive: forgotten; negative: backward transfer.  ``avg_forgetting``
is its mean over the ``T - 1`` earlier domains; ``final_avg_loss`` the mean of
``L[T-1][j]`` over all ``T`` domains.

Models (``--configs``): ``transformer`` and ``titans`` (the tiny configs) and
``hope`` (the tiny config once per ``--hope_cms`` schedule: CMS with 1, 2 and 3
levels by default; a schedule lists the levels' periods in ``bench schedules``
syntax, ``never@4`` a frozen-in-context level on a 4-step outer clock), or config
files, each with the shape of ``--override KEY=VALUE`` (default: d_model 64,
d_ff 192, 2 heads, as ``bench mqar``).  Tokens: each config's tokenizer (the
bundled 2K BPE).  Every model sees the same windows.

Prints a row per model and each loss matrix; ``--json PATH`` writes ``{"rows":
[{"model", "avg_forgetting", "final_avg_loss", "matrix", ...}], ...}`` and a PNG
of the matrices beside it.  At the default size (a few minutes on 2 CPU cores)
the models are tiny and briefly trained: the numbers show the method, not the
papers' claims.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from nl_jax.errors import DataError, UserError

BOOKS = ("nl_jax/data/assets/corpus/train/pg11_alice_in_wonderland.txt",
         "nl_jax/data/assets/corpus/train/pg120_treasure_island.txt",
         "nl_jax/data/assets/corpus/train/pg1661_adventures_of_sherlock_holmes.txt",
         "nl_jax/data/assets/corpus/train/pg84_frankenstein.txt")
HOPE_CMS = "32;32,never;8,32,never"


# -- the metrics (one definition, also used by ``bench schedules --shift``) -----------

def forgetting_per_domain(matrix: Sequence[Sequence[float]]) -> list[float]:
    """``forgetting_j = L[T-1][j] - min_{j <= l <= T-2} L[l][j]`` for ``j < T-1``.

    ``matrix[i][j]``: held-out loss on domain ``j`` after training stage ``i``
    (domain ``i`` is trained in stage ``i``); rows may stop at column ``i``.
    Chaudhry et al. (2018)'s forgetting (best earlier accuracy minus final
    accuracy) for losses: the final loss on an earlier domain minus the lowest
    loss it reached from its own stage to the one before the last.  Negative
    values are backward transfer.  Empty for fewer than 2 stages.
    """
    last = len(matrix) - 1
    return [float(matrix[last][j]) - min(float(matrix[i][j]) for i in range(j, last))
            for j in range(last)]


def average_forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean of ``forgetting_per_domain`` over the earlier domains (nan for 1 stage)."""
    values = forgetting_per_domain(matrix)
    return float(np.mean(values)) if values else math.nan


def final_average_loss(matrix: Sequence[Sequence[float]]) -> float:
    """Mean held-out loss over all ``T`` domains after the last stage."""
    last = len(matrix) - 1
    return float(np.mean([matrix[last][j] for j in range(last + 1)]))


# -- the benchmark ---------------------------------------------------------------------

def domain_tokens(paths: Sequence[str], tokenizer, heldout_fraction: float,
                  min_tokens: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, training tokens, held-out tokens) per domain file."""
    from nl_jax.bench import tiny_lm
    out = []
    for path in paths:
        full = path if os.path.isabs(path) else os.path.join(tiny_lm.REPO_ROOT, path)
        try:
            with open(full, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"bench forgetting: cannot read domain text {path}: "
                            f"{getattr(e, 'strerror', None) or e}") from None
        ids = np.asarray(tokenizer.encode(text), np.int32)
        cut = int(len(ids) * (1.0 - heldout_fraction))
        if min(cut, len(ids) - cut) < min_tokens:
            raise DataError(f"bench forgetting: {path} has {len(ids)} tokens; each of its "
                            f"training and held-out parts needs at least {min_tokens} "
                            f"(--seq_len + 1); give a longer text or a larger "
                            f"--heldout_fraction")
        name = os.path.splitext(os.path.basename(path))[0].split("_", 1)[-1]
        out.append((name, ids[:cut], ids[cut:]))
    return out


def models(args) -> list[dict]:
    """Each model of ``--configs``: name, config file, its config, levels, CMS schedule."""
    from nl_jax.bench import schedules
    from nl_jax.bench.mqar import FAMILIES, model_config
    out = []
    overrides = [*args.override, ("data.seq_len", str(args.seq_len))]
    for spec in args.configs:
        if spec != "hope":
            name, config = model_config(spec, overrides, bench="forgetting")
            out.append({"model": name, "config": FAMILIES.get(spec, spec), "cms": None,
                        "cfg": config, "levels": config.levels.to_dict()})
            continue
        try:
            parsed = [(text, [schedules.parse_level(level, args.seq_len)
                              for level in text.split(",")])
                      for text in (s.strip() for s in args.hope_cms.split(";")) if text]
        except UserError as e:
            raise UserError(str(e).replace("bench schedules:", "bench forgetting: --hope_cms",
                                           1)) from None
        if not parsed:
            raise UserError("bench forgetting: --hope_cms names no CMS schedule")
        for text, levels in parsed:
            _, config = model_config("hope", overrides, bench="forgetting")
            config.model.cms.periods = tuple(p for p, _ in levels)
            optimizer = config.levels.default.optimizer.to_dict()
            out.append({"model": f"hope_cms{len(levels)}", "config": FAMILIES["hope"],
                        "cms": text, "cfg": config,
                        "levels": (schedules.levels_config(optimizer, levels)
                                   if any(e > 1 for _, e in levels)
                                   else config.levels.to_dict())})
    names = [m["model"] for m in out]
    for name in set(names):
        if names.count(name) > 1:
            for i, m in enumerate(m for m in out if m["model"] == name):
                m["model"] = f"{name}_{chr(ord('a') + i)}"
    return out


def run_model(model: dict, domains, args) -> dict:
    """Trains one model through the stages; its loss matrix and metrics."""
    from nl_jax.bench import tiny_lm
    data = np.concatenate([tiny_lm.batches(train, args.steps_per_stage, args.batch,
                                           args.seq_len, args.seed + 1 + j)
                           for j, (_, train, _) in enumerate(domains)])
    eval_sets = {name: tiny_lm.batches(held, args.eval_batches, args.batch, args.seq_len,
                                       args.seed + 101 + j)
                 for j, (name, _, held) in enumerate(domains)}
    boundaries = tuple(args.steps_per_stage * (i + 1) for i in range(len(domains)))
    run = tiny_lm.train_curve(model["levels"], model["cfg"].model, data, args.seed,
                              eval_sets=eval_sets, eval_steps=boundaries)
    matrix = [[run["evals"][step][name] for name, _, _ in domains] for step in boundaries]
    return {"model": model["model"], "config": model["config"], "cms": model["cms"],
            "avg_forgetting": average_forgetting(matrix),
            "final_avg_loss": final_average_loss(matrix), "matrix": matrix,
            "forgetting": forgetting_per_domain(matrix),
            "num_params": run["num_params"], "step_ms": run["step_ms"],
            "losses": [float(x) for x in run["losses"]]}


def format_rows(rows: list[dict], domains: list[str]) -> str:
    lines = [f"{'model':<14}{'cms':<16}{'params':>9}{'avg_forgetting':>16}"
             f"{'final_avg_loss':>16}{'step_ms':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<14}{r['cms'] or '-':<16}{r['num_params']:>9,}"
                     f"{r['avg_forgetting']:>16.4f}{r['final_avg_loss']:>16.4f}"
                     f"{r['step_ms']:>9.0f}")
    for r in rows:
        lines.append(f"\n{r['model']}: held-out loss after each stage (rows) on each domain "
                     f"(columns)")
        lines.append(f"{'after':<14}" + "".join(f"{d[:12]:>13}" for d in domains))
        for i, row in enumerate(r["matrix"]):
            lines.append(f"{domains[i][:12]:<14}" + "".join(f"{v:>13.4f}" for v in row))
    return "\n".join(lines)


def plot_matrices(rows: list[dict], domains: list[str], path: str, title: str) -> None:
    """The loss matrices (stage x domain), a panel per model, one colour scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([r["matrix"] for r in rows])
    fig, axes = plt.subplots(1, len(rows), figsize=(2.9 * len(rows) + 1.2, 3.4),
                             squeeze=False, layout="constrained")
    image = None
    for k, (ax, r) in enumerate(zip(axes[0], rows, strict=True)):
        m = np.array(r["matrix"])
        image = ax.imshow(m, vmin=values.min(), vmax=values.max(), cmap="viridis_r")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if j > i else "black")
        ax.set_xticks(range(len(domains)), [d[:8] for d in domains], rotation=45,
                      fontsize=7)
        ax.set_yticks(range(len(domains)), [d[:8] for d in domains], fontsize=7)
        ax.set_xlabel("held-out domain")
        if k == 0:
            ax.set_ylabel("after training on")
        ax.set_title(f"{r['model']}\nforgetting {r['avg_forgetting']:+.3f}", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="held-out loss (nats/token)")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str]):
    from nl_jax.bench.mqar import SHAPE, _Parser
    from nl_jax.bench.throughput import parse_override
    parser = _Parser("forgetting", prog="python -m nl_jax bench forgetting",
                     description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="transformer,titans,hope",
                        help="comma-separated: transformer, titans, hope (once per "
                             "--hope_cms schedule) or config files (default: all)")
    parser.add_argument("--hope_cms", default=HOPE_CMS,
                        help=f"';'-separated CMS schedules of the hope rows, in `bench "
                             f"schedules` syntax (default {HOPE_CMS!r}: 1, 2, 3 levels)")
    parser.add_argument("--domains", default=",".join(BOOKS),
                        help="comma-separated text files, one domain each, in training "
                             "order (default: the four bundled training novels)")
    parser.add_argument("--steps_per_stage", type=int, default=20,
                        help="training steps per domain (default 20)")
    parser.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    parser.add_argument("--seq_len", type=int, default=64,
                        help="tokens per window, training and held out (default 64)")
    parser.add_argument("--eval_batches", type=int, default=4,
                        help="held-out batches per domain (default 4)")
    parser.add_argument("--heldout_fraction", type=float, default=0.1,
                        help="the last part of each domain's tokens, held out (default 0.1)")
    parser.add_argument("--override", action="append", type=parse_override, default=None,
                        metavar="KEY=VALUE",
                        help="config override for every model, repeatable (default: "
                             + " ".join(f"{k}={v}" for k, v in SHAPE) + ")")
    parser.add_argument("--seed", type=int, default=0,
                        help="model initialisation and windows (default 0)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the rows here and a PNG beside (new files)")
    args = parser.parse_args(argv)
    for flag in ("steps_per_stage", "batch", "seq_len", "eval_batches"):
        if getattr(args, flag) < 1:
            raise UserError(f"bench forgetting: --{flag} must be a positive integer")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UserError("bench forgetting: --heldout_fraction must lie in (0, 1)")
    args.domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    if len(args.domains) < 2:
        raise UserError("bench forgetting: --domains needs at least 2 text files (a "
                        "sequence of domains)")
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.configs:
        raise UserError("bench forgetting: --configs names no config")
    args.override = list(SHAPE) if args.override is None else args.override
    return args


def main(argv: list[str]) -> int:
    import jax

    from nl_jax.bench import tiny_lm
    from nl_jax.bench.mqar import check_new_outputs, write_new
    from nl_jax.data.tokenizer import load_tokenizer
    args = parse_args(argv)
    check_new_outputs(args.json, "forgetting")
    todo = models(args)
    tokenizers, domains_of = {}, {}
    for m in todo:
        tok_cfg = m["cfg"].data.tokenizer
        key = (tok_cfg.kind, tok_cfg.path)
        if key not in tokenizers:
            tokenizers[key] = load_tokenizer(tok_cfg, tiny_lm.REPO_ROOT)
            domains_of[key] = domain_tokens(args.domains, tokenizers[key],
                                            args.heldout_fraction, args.seq_len + 1)
        if tokenizers[key].vocab_size != m["cfg"].model.vocab_size:
            raise UserError(f"bench forgetting: {m['model']}: model.vocab_size "
                            f"{m['cfg'].model.vocab_size} is not its tokenizer's "
                            f"{tokenizers[key].vocab_size}")
        m["domains"] = domains_of[key]
    names = [name for name, _, _ in todo[0]["domains"]]
    rows = []
    for m in todo:
        print(f"{m['model']}: {len(names)} stages x {args.steps_per_stage} steps x "
              f"{args.batch} x {args.seq_len} tokens", file=sys.stderr, flush=True)
        rows.append(run_model(m, m["domains"], args))
    print(f"forgetting over {len(names)} domains ({', '.join(names)}), "
          f"{args.steps_per_stage} steps per stage x {args.batch} x {args.seq_len} tokens; "
          f"device {jax.devices()[0].platform}")
    print(format_rows(rows, names))
    if args.json:
        out = {"rows": rows, "domains": names, "domain_files": args.domains,
               "steps_per_stage": args.steps_per_stage, "batch": args.batch,
               "seq_len": args.seq_len, "eval_batches": args.eval_batches,
               "heldout_fraction": args.heldout_fraction, "seed": args.seed,
               "overrides": [f"{k}={v}" for k, v in args.override],
               "definition": "forgetting_j = L[T-1][j] - min_{j<=l<=T-2} L[l][j]; "
                             "avg over j < T-1",
               "device": jax.devices()[0].platform,
               "date": datetime.date.today().isoformat()}
        write_new(args.json, out, "forgetting")
        png = os.path.splitext(args.json)[0] + ".png"
        plot_matrices(rows, names, png, f"held-out loss after each stage "
                                        f"({args.steps_per_stage} steps per domain)")
        print(f"wrote {args.json} and {png}")
    return 0
