"""``python -m nl_jax bench schedules --config FILE --grid KEY=V1;V2 ... --out DIR``.

A schedule sweep on any config: each ``--grid KEY=V1;V2;...`` lists values of
one config key (parsed like ``--config.KEY=VALUE``); the sweep crosses the
grids and trains every point as a real run of the config (``nl_jax.train.loop.
train``) with the ``--config.*`` overrides of the command line and the point's
grid values on top, each for ``--steps`` optimizer steps (the same tokens for
every point; default: the config's ``train.steps``), in
``DIR/points/<index>-<slug>/`` (train's own output goes to ``train.log`` there;
the terminal shows one line per point and a table at the end).  For the sweep,
unless the command line sets them: ``train.eval_every=0`` (held-out loss once,
at the end), ``train.sample_tokens=0``, ``train.checkpoint_every=0`` (one
checkpoint at the end) and ``train.log_every`` about ``steps / 50``.

Run the same command again to resume: a point whose ``final_metrics.json``
exists is not trained again (its results are re-read; a finished point made
with another config is an error), a point stopped midway restarts or resumes
through ``train``'s own resume.  Writes into ``DIR``: ``sweep.csv``,
``sweep.json`` (per point: grid values, resolved config, train loss curve,
held-out loss, tokens/s, peak device memory, parameters),
``sweep_loss_curves.png`` and ``sweep_loss_vs_speed.png``.

Memory per point: ``peak_bytes``, the device's memory high-water mark of the
sweep process after the point (``memory_stats``, so never below an earlier
point's in the same process; null where the device does not report it, as on
CPU), and ``step_memory_bytes``, the compiled train step's footprint per device
(arguments + temporaries + outputs, XLA's memory analysis; null if unknown).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import os
import re
import sys
import time
from typing import Any

import ml_collections

from nl_jax import config as config_lib
from nl_jax.errors import ConfigError, UserError

PROG = "python -m nl_jax bench schedules --config FILE"
GRID_EXAMPLE = "--grid 'model.cms.periods=(32,\"never\");(16,64,\"never\")'"


def split_values(text: str) -> list[str]:
    """``'(32,"never");(16,"x;y")'`` -> the values between top-level ``;``."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == ";" and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return parts


def parse_grid(text: str) -> tuple[str, list[str]]:
    """``'levels.default.every=1;4'`` -> ("levels.default.every", ["1", "4"])."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.]+", key):
        raise ConfigError(f"bench schedules: --grid {text!r}: expected KEY=V1;V2;..., "
                          f"e.g. {GRID_EXAMPLE}")
    values = split_values(values)
    if any(not v for v in values):
        raise ConfigError(f"bench schedules: --grid {text!r}: an empty value; separate "
                          f"the values of {key} with ';', e.g. --grid '{key}=1;4'")
    if len(set(values)) != len(values):
        raise ConfigError(f"bench schedules: --grid {text!r}: a value is listed twice")
    return key, values


def _slug(points: list[tuple[str, str]]) -> str:
    parts = []
    for key, value in points:
        clean = re.sub(r"[^A-Za-z0-9.,=+-]+", "", value.replace(" ", ""))
        parts.append(f"{key.rsplit('.', 1)[-1]}={clean or 'x'}")
    return "_".join(parts)[:80] or "base"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as ``train`` writes ``config.json`` (tuples as lists)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def build_points(spec: str, overrides: list[tuple[str, str]], grids: list[tuple[str, list]],
                 steps: int | None) -> list[dict]:
    """Every grid point's resolved config (checked now, before anything trains)."""
    import jax
    keys = [k for k, _ in grids]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"bench schedules: --grid lists {twice[0]} twice; give all of "
                          f"its values in one --grid, separated by ';'")
    base = config_lib.load_config_file(spec)
    user_keys = {k for k, _ in overrides}
    sweep_defaults = [("train.eval_every", "0"), ("train.sample_tokens", "0"),
                      ("train.checkpoint_every", "0")]
    if steps is not None:
        if steps < 1:
            raise ConfigError("bench schedules: --steps must be >= 1")
        sweep_defaults.append(("train.steps", str(steps)))
    points = []
    for index, combo in enumerate(itertools.product(*[values for _, values in grids])):
        chosen = list(zip(keys, combo, strict=True))
        config = ml_collections.ConfigDict(base.to_dict())
        config_lib.apply_overrides(config, [kv for kv in sweep_defaults
                                            if kv[0] not in user_keys])
        if "train.log_every" not in user_keys:
            every = max(1, min(int(config.train.log_every), int(config.train.steps) // 50))
            config_lib.apply_overrides(config, [("train.log_every", str(every))])
        try:
            config_lib.apply_overrides(config, overrides)
        except ConfigError as e:
            raise ConfigError(f"bench schedules: {e}") from None
        for key, value in chosen:
            try:
                config_lib.apply_overrides(config, [(key, value)])
            except ConfigError as e:
                message = str(e).replace(f"--config.{key}=", "value ")
                raise ConfigError(f"bench schedules: --grid {key}: {message}") from None
        where = " ".join(f"{k}={v}" for k, v in chosen) or "the base config"
        try:
            config_lib.check_known_keys(config, source="the resolved config")
            config_lib.validate(config, len(jax.devices()), jax.process_count())
        except ConfigError as e:
            raise ConfigError(f"bench schedules: point {where}: {e}") from None
        config.lock()
        points.append(dict(index=index, name=f"{index:03d}-{_slug(chosen)}",
                           grid=dict(chosen), config=config))
    return points


def read_curve(workdir: str) -> dict[str, list]:
    """The train loss curve and tokens/s of a point's ``metrics.jsonl``."""
    steps, losses, speeds = [], [], []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("split") == "train" and "loss" in record:
                    steps.append(int(record["step"]))
                    losses.append(record["loss"])
                    speeds.append(record.get("tokens_per_s"))
    return {"step": steps, "loss": losses, "tokens_per_s": speeds}


def _median(values: list) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)))
    if not values:
        return None
    mid = len(values) // 2
    return float(values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2)


def point_result(point: dict, workdir: str, final: dict, sidecar: dict) -> dict:
    curve = read_curve(workdir)
    # tokens/s: the median over logged windows after the first (which holds compilation)
    speeds = curve["tokens_per_s"][1:] or curve["tokens_per_s"]
    config = point["config"]
    return {"index": point["index"], "name": point["name"], "grid": point["grid"],
            "status": "done", "workdir": workdir,
            "steps": int(config.train.steps),
            "tokens": int(config.train.steps) * config.data.batch_size * config.data.seq_len,
            "eval_loss": final.get("eval_loss"),
            "train_loss_last": final.get("train_loss_last"),
            "tokens_per_s": _median(speeds) or final.get("tokens_per_s"),
            "peak_bytes": sidecar.get("peak_bytes"),
            "step_memory_bytes": sidecar.get("step_memory_bytes"),
            "num_params": final.get("num_params"),
            "wall_s": sidecar.get("wall_s", final.get("wall_s")),
            "curve": {"step": curve["step"], "loss": curve["loss"]},
            "config": _as_json(config)}


def _check_same_config(point: dict, workdir: str) -> None:
    saved_path = os.path.join(workdir, "config.json")
    if not os.path.exists(saved_path):
        return
    with open(saved_path, encoding="utf-8") as f:
        saved = _flat(json.load(f))
    now = _flat(_as_json(point["config"]))
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        shown = ", ".join(f"{k} ({saved.get(k)!r} there, {now.get(k)!r} now)"
                          for k in diff[:3])
        raise ConfigError(f"bench schedules: {workdir} was trained with another config "
                          f"({shown}{', ...' if len(diff) > 3 else ''}); use another --out, "
                          f"or delete that folder to train the point again")


class _StepMemory(logging.Handler):
    """Keeps the train step's compiled memory footprint that ``Trainer.compile``
    logs (arguments + temporaries + outputs, per device)."""

    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("step memory per device") and record.args:
            self.found.append(int(sum(record.args) * 2 ** 20))


@contextlib.contextmanager
def _library_log_to(stream, found: list):
    """The ``nl_jax`` logger writes into the point's log (not the sweep's terminal)."""
    logger = logging.getLogger("nl_jax")
    to_log, memory = logging.StreamHandler(stream), _StepMemory(found)
    to_log.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    propagate, level = logger.propagate, logger.level
    logger.addHandler(to_log)
    logger.addHandler(memory)
    logger.propagate = False
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(to_log)
        logger.removeHandler(memory)
        logger.propagate, logger.level = propagate, level


def run_point(point: dict, workdir: str, train_fn) -> tuple[dict, bool]:
    """(the point's result, whether it trained now)."""
    final_path = os.path.join(workdir, "final_metrics.json")
    sidecar_path = os.path.join(workdir, "sweep_point.json")
    _check_same_config(point, workdir)    # a finished or a stopped point alike
    if os.path.exists(final_path):
        with open(final_path, encoding="utf-8") as f:
            final = json.load(f)
        sidecar = {}
        if os.path.exists(sidecar_path):
            with open(sidecar_path, encoding="utf-8") as f:
                sidecar = json.load(f)
        return point_result(point, workdir, final, sidecar), False
    os.makedirs(workdir, exist_ok=True)
    import jax

    from nl_jax.bench.throughput import device_peak_bytes
    t0 = time.perf_counter()
    step_memory = []
    with open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            _library_log_to(log, step_memory):
        out = train_fn(point["config"], workdir)
    wall = time.perf_counter() - t0
    if out.get("interrupted"):
        raise KeyboardInterrupt
    if out.get("diverged"):
        result = {"index": point["index"], "name": point["name"], "grid": point["grid"],
                  "status": f"diverged at step {out.get('step')}", "workdir": workdir,
                  "eval_loss": None, "train_loss_last": None, "tokens_per_s": None,
                  "peak_bytes": None, "step_memory_bytes": None, "num_params": None, "wall_s": wall,
                  "steps": int(point["config"].train.steps), "tokens": None,
                  "curve": {k: v for k, v in read_curve(workdir).items() if k != "tokens_per_s"},
                  "config": _as_json(point["config"])}
        return result, True
    sidecar = {"peak_bytes": device_peak_bytes(jax.devices()), "wall_s": wall,
               "step_memory_bytes": step_memory[-1] if step_memory else None}
    _write_json(sidecar_path, sidecar)
    with open(final_path, encoding="utf-8") as f:
        final = json.load(f)
    return point_result(point, workdir, final, sidecar), True


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def write_outputs(out: str, header: dict, results: list[dict]) -> list[str]:
    keys = list(header["grid"])
    _write_json(os.path.join(out, "sweep.json"), {"sweep": header, "points": results})
    csv_path = os.path.join(out, "sweep.csv")
    columns = (["index", "name"] + keys + ["status", "eval_loss", "train_loss_last",
                                          "tokens_per_s", "peak_bytes", "step_memory_bytes",
                                          "num_params",
                                          "steps", "tokens", "wall_s", "workdir"])
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in results:
            writer.writerow([r["index"], r["name"]] + [r["grid"][k] for k in keys]
                            + ["" if r[c] is None else r[c] for c in columns[2 + len(keys):]])
    pngs = [os.path.join(out, "sweep_loss_curves.png"),
            os.path.join(out, "sweep_loss_vs_speed.png")]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(r):
        return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r["grid"].items()) or "base"
    title = f"{header['config']}: {header['steps']} steps"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["curve"]["step"]:
            ax.plot(r["curve"]["step"], r["curve"]["loss"], label=label(r))
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(pngs[0], dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r["eval_loss"] is not None and r["tokens_per_s"] is not None:
            ax.scatter([r["tokens_per_s"]], [r["eval_loss"]])
            ax.annotate(label(r), (r["tokens_per_s"], r["eval_loss"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training tokens/s")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(pngs[1], dpi=120)
    plt.close(fig)
    return [csv_path, os.path.join(out, "sweep.json")] + pngs


def main(argv: list[str], train_fn=None) -> int:
    spec, overrides, rest = config_lib.parse_overrides(argv)
    if spec is None:
        raise ConfigError("bench schedules: --grid, --out and --config.KEY=VALUE sweep a "
                          "config: add --config FILE, e.g. --config experiments/hope/tiny.py "
                          "(without them the toy byte-level benchmark runs, which takes "
                          "--schedules)")
    parser = argparse.ArgumentParser(prog=PROG, add_help=False)
    parser.add_argument("--grid", action="append", default=[])
    parser.add_argument("--steps", default=None)
    parser.add_argument("--out", default=None)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise UserError(f"bench schedules: unknown arguments {unknown} with --config; use "
                        f"--grid KEY=V1;V2, --steps N, --out DIR and --config.KEY=VALUE "
                        f"(--schedules, --shift and the toy-model flags work without "
                        f"--config)")
    if args.out is None:
        raise UserError("bench schedules: a sweep needs --out DIR (the points' workdirs and "
                        "the results go there; run the command again to resume)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"bench schedules: --out {args.out} is a file; give a folder "
                        f"(created if missing; an existing sweep there is resumed)")
    steps = None
    if args.steps is not None:
        if not args.steps.isdigit() or int(args.steps) < 1:
            raise ConfigError(f"bench schedules: --steps {args.steps!r}: expected an "
                              f"integer >= 1")
        steps = int(args.steps)
    grids = [parse_grid(g) for g in args.grid]
    points = build_points(spec, overrides, grids, steps)
    if train_fn is None:
        from nl_jax.train.loop import train as train_fn
    import jax
    first = points[0]["config"]
    tokens = first.train.steps * first.data.batch_size * first.data.seq_len
    header = {"config": spec, "overrides": [f"--config.{k}={v}" for k, v in overrides],
              "grid": dict(grids), "steps": int(first.train.steps),
              "tokens_per_point": int(tokens), "device": jax.devices()[0].device_kind,
              "platform": jax.devices()[0].platform}
    os.makedirs(os.path.join(args.out, "points"), exist_ok=True)
    print(f"sweep of {spec}: {len(points)} point(s) x {first.train.steps} steps "
          f"({tokens:,} tokens each) on {header['platform']} ({header['device']}), "
          f"in {args.out}", flush=True)
    results, stopped = [], False
    for point in points:
        workdir = os.path.join(args.out, "points", point["name"])
        tag = f"[{point['index'] + 1}/{len(points)}] {point['name']}"
        print(f"{tag} ...", end="", flush=True)
        try:
            result, trained = run_point(point, workdir, train_fn)
        except KeyboardInterrupt:
            print(" interrupted", flush=True)
            stopped = True
            break
        except UserError as e:
            print(" failed", flush=True)
            if str(e).startswith("bench schedules:"):
                raise
            raise UserError(f"bench schedules: point {point['name']}: {e} "
                            f"(log: {os.path.join(workdir, 'train.log')})") from None
        results.append(result)
        how = f"{result['wall_s']:.1f} s" if trained and result["wall_s"] else "done before"
        print(f" {result['status']}: eval_loss {_fmt(result['eval_loss'], '.4f')}, "
              f"tokens/s {_fmt(result['tokens_per_s'], ',.0f')} ({how})", flush=True)
    if results:
        written = write_outputs(args.out, header, results)
    keys = list(header["grid"])
    width = max([len(k.rsplit(".", 1)[-1]) for k in keys] + [len(str(r["grid"][k]))
                for r in results for k in keys] + [6]) + 2
    print("".join(f"{k.rsplit('.', 1)[-1]:<{width}}" for k in keys)
          + f"{'params':>10}{'eval_loss':>11}{'train_loss':>11}{'tokens/s':>10}"
          + f"{'peak_MiB':>10}{'step_MiB':>10}")
    for r in results:
        peak, step_mem = (None if r[k] is None else r[k] / 2 ** 20
                          for k in ("peak_bytes", "step_memory_bytes"))
        print("".join(f"{r['grid'][k]!s:<{width}}" for k in keys)
              + f"{_fmt(r['num_params'], ','):>10}{_fmt(r['eval_loss'], '.4f'):>11}"
              + f"{_fmt(r['train_loss_last'], '.4f'):>11}"
              + f"{_fmt(r['tokens_per_s'], ',.0f'):>10}{_fmt(peak, '.1f'):>10}"
              + f"{_fmt(step_mem, '.1f'):>10}")
    if results:
        print("wrote " + ", ".join(written))
    if stopped:
        print(f"interrupted: {len(results)} of {len(points)} points finished; run the same "
              f"command again to resume", file=sys.stderr)
        return 130
    return 0
