"""``python -m nl_jax bench schedules [--json PATH] [--steps N] [--schedules S]``.

Update-frequency schedules of a Continuum Memory System (NL Eq. 70-73): the
tiny byte-level LM of ``tiny_lm`` (attention mixer, vocab 256, d_model 64, 2
layers, 64 bytes x 8 sequences per step) with a CMS channel mixer, one run
per schedule, all on the same windows and the same outer optimizer (the
AdamW of ``nl_jax/configs/optimizers/adamw.py``).

A schedule lists the CMS levels in order (the sequential chain, Eq. 73,
unless ``--variant`` says otherwise), separated by commas; each level is

* ``16``: updated in context every 16 tokens with the gradient accumulated
  over the chunk (Eq. 71), its initial weights trained by the outer optimizer;
* ``never``: frozen in context (a plain SwiGLU MLP);
* either followed by ``@k``: its (initial) weights are a step-clock level of
  the outer optimizer updated every k steps, with the gradients of the k
  steps averaged (``config.levels`` ``every``).

Schedules are separated by ``;``.  Reports per schedule (the mean over
``--seeds`` runs, with the standard deviation under ``std``): the final training
loss (mean over the last 10% of steps), the loss on held-out windows (the
files of ``data.eval_files``, in-context levels adapting within each window
as in training), the median step time and the parameter count; with
``--json`` writes ``{"rows": [...]}`` and a PNG of the loss curves beside it.

``--shift``: a continual-learning run, the setting CMS is meant for (NL
section 7).  The first half of the steps trains on the fiction of
``data.train_files``, the second half on another distribution (default: the
first 80% of the bundled WikiText-2 text); rows add ``eval_loss_mid`` (the
fiction held-out loss after the first half), ``forgetting`` (``eval_loss``
at the end minus ``eval_loss_mid``: ``bench forgetting``'s definition,
``forgetting.average_forgetting``, on these two stages) and ``eval_loss_shift``
(held-out loss on the last 20% of the second text).

``--config FILE --grid KEY=V1;V2 ... --steps N --out DIR [--config.KEY=VALUE]``:
a sweep on any config instead of the toy model (``nl_jax/bench/sweep.py``):
every point of the grids trains as a real run of the config, with a resumable
``--out DIR`` and CSV, JSON and PNG results, e.g.::

    python -m nl_jax bench schedules --config experiments/hope/tiny.py \
        --grid 'model.cms.periods=(32,"never");(16,64,"never")' \
        --grid 'levels.default.every=1;4' --steps 60 --out runs/sweeps/hope_cms
"""

from __future__ import annotations

import argparse
import importlib
import os

import jax
import numpy as np

from nl_jax.bench import forgetting as forgetting_lib
from nl_jax.bench import tiny_lm
from nl_jax.errors import ConfigError, DataError

DEFAULT_SCHEDULES = "never,never;32,never;16,never;8,never;16,never@4"
SHIFT_TEXT = "nl_jax/data/assets/corpus/wikitext2/valid.txt"
NEVER = "never"


def parse_level(text: str, seq_len: int) -> tuple[int | str, int]:
    """``"16"`` -> (16, 1); ``"never@4"`` -> ("never", 4)."""
    period, _, every = text.strip().partition("@")
    hint = "a level is a period in tokens or 'never', optionally followed by @<steps>"
    if period != NEVER:
        if not period.isdigit() or int(period) < 1:
            raise ConfigError(f"bench schedules: level {text!r}: {hint}, e.g. 16 or never@4")
        period = int(period)
        if period >= seq_len:
            raise ConfigError(
                f"bench schedules: level {text!r}: a period of {period} tokens never "
                f"fires inside a {seq_len}-token window; use a period below {seq_len}, "
                f"or 'never@<steps>' for a level on the optimizer's step clock")
    if not every:
        return period, 1
    if not every.isdigit() or int(every) < 1:
        raise ConfigError(f"bench schedules: level {text!r}: the step period after '@' "
                          f"must be an integer >= 1; {hint}")
    return period, int(every)


def parse_schedules(text: str, seq_len: int) -> list[tuple[str, list]]:
    """``"16,never;never@4"`` -> [(name, [(period, every), ...]), ...]."""
    schedules = []
    for name in (s.strip() for s in text.split(";")):
        if not name:
            continue
        levels = [parse_level(level, seq_len) for level in name.split(",")]
        schedules.append((name, levels))
    if not schedules:
        raise ConfigError("bench schedules: --schedules names no schedule; e.g. "
                          f"--schedules '{DEFAULT_SCHEDULES}'")
    names = [n for n, _ in schedules]
    if len(set(names)) != len(names):
        raise ConfigError(f"bench schedules: a schedule is listed twice in {names}")
    return schedules


def levels_config(optimizer: dict, levels: list) -> dict:
    """Outer levels: one per CMS level on a step period > 1, the rest every step."""
    slow = [i for i, (_, every) in enumerate(levels) if every > 1]
    config = {}
    for i in slow:
        config[f"cms_level_{i}"] = dict(params=rf"blocks/\d+/mlp/levels/{i}/.*",
                                        every=levels[i][1], optimizer=dict(optimizer))
    others = "|".join(str(i) for i in slow)
    config["default"] = dict(
        params=rf"(?!blocks/\d+/mlp/levels/({others})/).*" if slow else ".*",
        every=1, optimizer=dict(optimizer))
    return config


def is_sweep(argv: list[str]) -> bool:
    """Whether ``argv`` asks for a sweep on a config (``nl_jax/bench/sweep.py``)."""
    return any(a in ("--config", "--grid", "--out") or a.startswith(
        ("--config=", "--config.", "--grid=", "--out=")) for a in argv)


def main(argv: list[str]) -> int:
    if is_sweep(argv) and not any(a in ("-h", "--help") for a in argv):
        from nl_jax.bench import sweep
        return sweep.main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m nl_jax bench schedules", description=__doc__.splitlines()[0],
        epilog="A sweep on any config: --config FILE --grid 'KEY=V1;V2' [--grid ...] "
               "--steps N --out DIR [--config.KEY=VALUE ...] (see nl_jax/bench/sweep.py)")
    parser.add_argument("--json", default=None, help="write the rows here (and a PNG beside)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--config", default=None,
                        help="sweep this config file instead of the toy model (with --grid, "
                             "--out; see the epilog)")
    parser.add_argument("--schedules", default=DEFAULT_SCHEDULES,
                        help=f"';'-separated schedules (default {DEFAULT_SCHEDULES!r})")
    parser.add_argument("--variant", default="sequential",
                        choices=("sequential", "independent", "nested"),
                        help="CMS variant: sequential (Eq. 73), independent (Eq. 74) or "
                             "nested (Eq. 72; levels slowest first)")
    parser.add_argument("--cms_lr", type=float, default=1e-3,
                        help="scale of the in-context levels' learning rate (model.cms.lr)")
    parser.add_argument("--text", default=None,
                        help="text file for byte tokens (default: base data.train_files)")
    parser.add_argument("--max_bytes", type=int, default=200_000)
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--shift", action="store_true",
                        help="continual learning: the second half of the steps trains on "
                             "--shift_text (reports forgetting)")
    parser.add_argument("--shift_text", default=SHIFT_TEXT,
                        help="text of the second phase with --shift (first 80%% trains, "
                             "the rest is held out); relative to the repository or absolute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per schedule (seeds --seed, --seed + 10, ...: model init "
                             "and windows); rows give the mean and, over 2+, the std")
    args = parser.parse_args(argv)
    if args.steps < 2:
        raise DataError("bench schedules: --steps must be >= 2")
    schedules = parse_schedules(args.schedules, tiny_lm.SEQ_LEN)
    train_paths = [args.text] if args.text else tiny_lm.default_text_files()
    eval_paths = [args.text] if args.text else tiny_lm.default_text_files("eval_files")
    if not train_paths or not eval_paths:
        raise DataError("bench schedules: no text found at base data.train_files / "
                        "data.eval_files; pass --text FILE")
    if args.seeds < 1:
        raise DataError("bench schedules: --seeds must be >= 1")
    steps_a = args.steps // 2 if args.shift else args.steps
    train_tokens = tiny_lm.byte_tokens(train_paths, args.max_bytes, "schedules")
    eval_tokens = tiny_lm.byte_tokens(eval_paths, args.max_bytes, "schedules")
    if args.shift:
        path = args.shift_text if os.path.isabs(args.shift_text) else os.path.join(
            tiny_lm.REPO_ROOT, args.shift_text)
        shift_tokens = tiny_lm.byte_tokens([path], 10 ** 8, "schedules")
        cut = int(0.8 * len(shift_tokens))
    n_eval = max(1, args.eval_batches)

    def windows(seed):
        """Training windows and held-out sets of one seed (the same for every schedule)."""
        def draw(tokens, n, seed):
            return tiny_lm.batches(tokens, n, tiny_lm.BATCH, tiny_lm.SEQ_LEN, seed)
        data = draw(train_tokens, steps_a, seed)
        evals = {"heldout": draw(eval_tokens, n_eval, seed + 1)}
        if args.shift:
            data = np.concatenate([data, draw(shift_tokens[:cut], args.steps - steps_a,
                                              seed + 2)])
            evals["shift"] = draw(shift_tokens[cut:], n_eval, seed + 3)
        return data, evals

    seeds = [args.seed + 10 * i for i in range(args.seeds)]
    per_seed = {seed: windows(seed) for seed in seeds}
    optimizer = importlib.import_module("nl_jax.configs.optimizers.adamw").get_config(
    ).levels["default"]["optimizer"].to_dict()
    metrics = ["final_loss", "eval_loss"] + (
        ["eval_loss_mid", "forgetting", "eval_loss_shift"] if args.shift else [])

    curves, rows = {}, []
    for name, levels in schedules:
        model_cfg = tiny_lm.tiny_model_config()
        model_cfg.mlp = "cms"
        model_cfg.cms = dict(periods=tuple(p for p, _ in levels), variant=args.variant,
                             lr=args.cms_lr)       # SwiGLU levels, the default bounds
        runs = []
        for seed in seeds:
            data, eval_sets = per_seed[seed]
            run = tiny_lm.train_curve(levels_config(optimizer, levels), model_cfg, data,
                                      seed, eval_sets=eval_sets,
                                      eval_steps=(steps_a,) if args.shift else ())
            final = run["evals"][args.steps]
            tail = max(1, args.steps // 10)
            values = {"final_loss": float(np.mean(run["losses"][-tail:])),
                      "eval_loss": final["heldout"]}
            if args.shift:
                mid = run["evals"][steps_a]["heldout"]
                matrix = [[mid], [final["heldout"], final["shift"]]]   # stage x domain
                values.update(eval_loss_mid=mid,
                              forgetting=forgetting_lib.average_forgetting(matrix),
                              eval_loss_shift=final["shift"])
            runs.append((run, values))
        curves[name] = np.mean([run["losses"] for run, _ in runs], axis=0)
        row = {"schedule": name, "periods": [p for p, _ in levels],
               "every": [e for _, e in levels], "seeds": len(seeds)}
        row.update({m: float(np.mean([v[m] for _, v in runs])) for m in metrics})
        row["step_ms"] = float(np.median([run["step_ms"] for run, _ in runs]))
        row["num_params"] = runs[0][0]["num_params"]
        if len(seeds) > 1:
            row["std"] = {m: float(np.std([v[m] for _, v in runs], ddof=1)) for m in metrics}
        rows.append(row)

    shifted = f", second half on {args.shift_text}" if args.shift else ""
    print(f"{args.steps} steps x {tiny_lm.BATCH} x {tiny_lm.SEQ_LEN} bytes{shifted}, "
          f"CMS {args.variant}, "
          f"{len(seeds)} seed(s){' (mean +- std)' if len(seeds) > 1 else ''}, "
          f"device {jax.devices()[0].platform}")
    width = 18 if len(seeds) > 1 else 12
    print(f"{'schedule':<22}{'params':>9}" + "".join(f"{m:>{width}}" for m in metrics)
          + f"{'step_ms':>9}")
    for r in rows:
        cells = [f"{r[m]:.4f}" + (f"+-{r['std'][m]:.4f}" if "std" in r else "")
                 for m in metrics]
        print(f"{r['schedule']:<22}{r['num_params']:>9,}"
              + "".join(f"{c:>{width}}" for c in cells) + f"{r['step_ms']:>9.2f}")
    if args.json:
        tiny_lm.write_results(args.json, rows, curves, f"bench schedules: CMS ({args.variant})")
    return 0
