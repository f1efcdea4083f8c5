"""``python -m nl_jax bench throughput [--json PATH]``: training speed of every family.

Transformer++ (``nl_jax/configs/transformer/tiny.py``), Titans MAG
(``nl_jax/configs/titans/tiny.py``, ``model.mixer=titans_mag``) and Hope
(``nl_jax/configs/hope/tiny.py``), each with the same shape overrides (default:
d_model 256, 4 layers, 4 heads, d_ff 1024, the Llama-2 32K vocabulary, fp32;
``--override KEY=VALUE`` for others), over ``--lengths`` (default 512, 2048,
8192) at a fixed number of tokens per step (``--tokens_per_step``, default
8192: batch 16, 4, 1).  Every row is the trainer's real train step
(``train.aot.train_program``: the config's levels, mesh, donated state) on
random token ids (no tokenizer), on the same devices at every length
(``--devices``, default 1).

Per row: training tokens/s and step time (median of ``--steps`` timed steps
after ``--warmup`` steps; compilation is not timed), peak memory, the
analytic model FLOPs per token (``nl_jax/models/flops.py``: 3 x the forward
matmuls) and the useful FLOP rate they give (FLOPs/token x tokens/s).  Peak
memory: the device's high-water mark of memory in use (``memory_stats``,
accelerators) when this row raised it; otherwise, and on the CPU, the compiled
step's memory analysis (arguments + outputs + temporaries - aliased
buffers).  Each row says which (``peak_source``).

Each row also records the host's 1-minute load average when it finished: on a
shared machine other work slows the steps.

Per model: the fitted exponent of time per token vs length (least-squares
slope of log(step time / tokens per step) against log(length)): 0 for a
linear-time model at a fixed number of tokens per step, 1 where attention's
quadratic term dominates.

``--json PATH`` writes ``{"rows": [...], "exponents": {...}, ...metadata}``
and a PNG of tokens/s vs length beside it (same name, ``.png``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import time

import numpy as np

from nl_jax.bench.memory import int_list
from nl_jax.errors import UserError

MODELS = {    # name -> (config file, its own overrides)
    "transformer": ("nl_jax/configs/transformer/tiny.py", (("model.mixer", "attention"),)),
    "titans_mag": ("nl_jax/configs/titans/tiny.py", (("model.mixer", "titans_mag"),)),
    "hope": ("nl_jax/configs/hope/tiny.py", (("model.mixer", "self_modifying"),)),
}
SHAPE = (("model.d_model", "256"), ("model.n_layers", "4"), ("model.n_heads", "4"),
         ("model.d_ff", "1024"), ("model.vocab_size", "32000"), ("model.dtype", "float32"))
LENGTHS = (512, 2048, 8192)
TOKENS_PER_STEP = 8192
DEVICE_PEAK = "device memory_stats peak_bytes_in_use"
COMPILED_PEAK = "compiled memory analysis (arguments + outputs + temporaries - aliased)"


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are ``UserError`` (one ``error:`` line, exit 2)."""

    def error(self, message):
        raise UserError(f"bench throughput: {message}")


def parse_override(text: str) -> tuple[str, str]:
    """``"model.d_model=512"`` -> ("model.d_model", "512") (argparse type)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (a config key such as "
                                         f"model.d_model=512), got {text!r}")
    return key.removeprefix("--config."), value


def model_names(text: str) -> list[str]:
    """``"transformer,hope"`` -> the names, each one of ``MODELS`` (argparse type)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(MODELS)}")
    return names


def model_config(name: str, seq_len: int, batch: int, overrides=()):
    """The config of one row: the model's file, ``SHAPE``, ``overrides``, the length."""
    from nl_jax import config as config_lib
    path, own = MODELS[name]
    config = config_lib.load_config_file(path)
    lengths = (("data.seq_len", str(seq_len)), ("data.batch_size", str(batch)))
    return config_lib.apply_overrides(config, [*own, *SHAPE, *overrides, *lengths])


def checked_config(name: str, seq_len: int, tokens_per_step: int, devices: int,
                   overrides=()):
    """``model_config`` at ``tokens_per_step`` tokens, validated for ``devices``."""
    from nl_jax import config as config_lib
    config = model_config(name, seq_len, tokens_per_step // seq_len, overrides)
    return config_lib.validate(config, devices)


def random_batch(program, vocab_size: int, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random token ids as the step's ``inputs`` / ``targets``, on the batch sharding."""
    import jax
    tokens = np.random.default_rng(seed).integers(0, vocab_size, (batch, seq_len + 1),
                                                  dtype=np.int32)
    return {"inputs": jax.device_put(tokens[:, :-1], program.batch_sharding),
            "targets": jax.device_put(tokens[:, 1:], program.batch_sharding)}


def device_peak_bytes(devices) -> int | None:
    """The devices' high-water mark of memory in use (summed), None where unknown."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    return None if None in peaks else int(sum(peaks))


def load_average() -> float | None:
    """The host's 1-minute load average (other work sharing the cores), if known."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def peak_memory(device_peak: int | None, device_peak_before: int | None,
                compiled) -> tuple[int | None, str]:
    """(bytes, source) of a row's peak memory: the devices' high-water mark if the
    row raised it, else the compiled step's memory analysis."""
    from nl_jax.train.aot import step_bytes
    if device_peak is not None and (device_peak_before is None
                                    or device_peak > device_peak_before):
        return device_peak, DEVICE_PEAK
    memory = compiled.memory_analysis()
    return (step_bytes(memory) if memory is not None else None), COMPILED_PEAK


def timed_steps(compiled, state, batch, warmup: int, steps: int) -> tuple[list[float], dict]:
    """Seconds of each of ``steps`` train steps after ``warmup`` untimed ones."""
    import jax
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, state


def measure_row(name: str, seq_len: int, tokens_per_step: int, devices, warmup: int,
                steps: int, overrides=()) -> dict:
    """One model at one length: build, compile, time (module docstring)."""
    from nl_jax.models.flops import model_flops_per_token
    from nl_jax.train.aot import train_program
    from nl_jax.train.state import count_params

    batch_size = tokens_per_step // seq_len
    config = checked_config(name, seq_len, tokens_per_step, len(devices), overrides)
    flops_per_token = model_flops_per_token(config)
    peak_before = device_peak_bytes(devices)
    program = train_program(config, devices, allocate=True)
    state = program.init()
    batch = random_batch(program, config.model.vocab_size, batch_size, seq_len)
    start = time.perf_counter()
    compiled = program.step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    times, state = timed_steps(compiled, state, batch, warmup, steps)
    peak, source = peak_memory(device_peak_bytes(devices), peak_before, compiled)
    step_s = statistics.median(times)
    tokens_per_s = tokens_per_step / step_s
    del state, batch, compiled
    gc.collect()
    return {"model": name, "mixer": config.model.mixer, "mlp": config.model.mlp,
            "params": count_params(program.abstract_params), "seq_len": seq_len,
            "batch": batch_size, "mesh": dict(program.mesh.shape),
            "tokens_per_s": tokens_per_s, "step_ms": 1e3 * step_s,
            "step_ms_all": [1e3 * t for t in times], "peak_bytes": peak,
            "peak_source": source, "flops_per_token": flops_per_token,
            "model_flops_per_s": flops_per_token * tokens_per_s, "compile_s": compile_s,
            "load_average_1m": load_average()}


def time_per_token_exponent(rows: list[dict]) -> float | None:
    """Least-squares slope of log(step time per token) vs log(length) (None with
    fewer than two lengths)."""
    if len({r["seq_len"] for r in rows}) < 2:
        return None
    x = np.log([r["seq_len"] for r in rows])
    y = np.log([r["step_ms"] / (r["seq_len"] * r["batch"]) for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def device_layout(devices, mesh_shape: dict) -> str:
    """E.g. ``"1 x cpu, mesh data=1 fsdp=1 tensor=1"``."""
    kind = devices[0].device_kind
    axes = " ".join(f"{k}={v}" for k, v in mesh_shape.items())
    return f"{len(devices)} x {kind}, mesh {axes}"


def print_table(rows: list[dict], exponents: dict, layout: str, overrides=()) -> None:
    """The rows and the exponents, human-readable."""
    shape = ", ".join(f"{k}={v}" for k, v in [*SHAPE, *overrides])
    print(f"training throughput on {layout}; {shape}")
    print(f"{'model':12s} {'params':>11s} {'seq_len':>7s} {'batch':>5s} {'tokens/s':>10s} "
          f"{'step ms':>10s} {'peak MiB':>9s} {'GFLOP/tok':>9s} {'GFLOP/s':>8s}")
    for r in rows:
        peak = f"{r['peak_bytes'] / 2**20:9.1f}" if r["peak_bytes"] is not None else f"{'-':>9s}"
        print(f"{r['model']:12s} {r['params']:11,d} {r['seq_len']:7d} {r['batch']:5d} "
              f"{r['tokens_per_s']:10.1f} {r['step_ms']:10.1f} {peak} "
              f"{r['flops_per_token'] / 1e9:9.3f} {r['model_flops_per_s'] / 1e9:8.1f}")
    sources = sorted({r["peak_source"] for r in rows})
    print(f"peak memory: {'; '.join(sources)}")
    print("exponent of time per token vs length (0: linear time): " + ", ".join(
        f"{m} {e:.3f}" if e is not None else f"{m} -" for m, e in exponents.items()))


def plot_tokens_per_s(rows: list[dict], path: str) -> None:
    """Tokens/s against length, one line per model, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        own = [r for r in rows if r["model"] == name]
        ax.plot([r["seq_len"] for r in own], [r["tokens_per_s"] for r in own],
                marker="o", label=name)
    ax.set_xscale("log", base=2)
    lengths = sorted({r["seq_len"] for r in rows})
    ax.set_xticks(lengths, [str(t) for t in lengths])
    ax.set_xlabel("sequence length (tokens per step fixed)")
    ax.set_ylabel("training tokens/s")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def metadata(devices, layout: str, argv: list[str], args) -> dict:
    """Machine, date, versions, device layout and the command of a run."""
    import jax
    return {"machine": {"node": platform.node(), "platform": platform.platform(),
                        "processor": platform.processor(), "cpu_count": os.cpu_count()},
            "date": datetime.datetime.now(datetime.UTC).isoformat(),
            "jax_version": jax.__version__, "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "devices": len(devices),
            "device_layout": layout, "dtype": dict(SHAPE)["model.dtype"],
            "shape_overrides": dict(SHAPE), "overrides": dict(args.override),
            "tokens_per_step": args.tokens_per_step, "steps": args.steps,
            "warmup": args.warmup,
            "command": "python -m nl_jax bench throughput " + shlex.join(argv)}


def summary(rows: list[dict], devices, argv: list[str], args) -> dict:
    """The JSON document: rows, per-model exponents (over the rows so far), metadata."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    exponents = {m: time_per_token_exponent([r for r in rows if r["model"] == m])
                 for m in models}
    layout = device_layout(devices, rows[0]["mesh"])
    return {"rows": rows, "exponents": exponents, **metadata(devices, layout, argv, args)}


def write_results(path: str, result: dict) -> str:
    """The JSON at ``path`` and the tokens/s plot beside it; returns the PNG's path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    png = os.path.splitext(path)[0] + ".png"
    plot_tokens_per_s(result["rows"], png)
    return png


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = _Parser(prog="python -m nl_jax bench throughput",
                     description=__doc__.splitlines()[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON (and a "
                        "PNG of tokens/s vs length beside it)")
    parser.add_argument("--models", type=model_names, default=list(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)} (default all)")
    parser.add_argument("--lengths", type=int_list, default=list(LENGTHS),
                        help="sequence lengths, comma-separated (default 512,2048,8192)")
    parser.add_argument("--tokens_per_step", type=int, default=TOKENS_PER_STEP,
                        help="batch x length at every length (default 8192)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps after compiling (default 1)")
    parser.add_argument("--devices", type=int, default=1,
                        help="devices of the mesh, the same at every length (default 1)")
    parser.add_argument("--override", type=parse_override, action="append", default=[],
                        metavar="KEY=VALUE", help="config override applied to every model "
                        "after the shape overrides, e.g. model.d_model=512 (repeatable)")
    args = parser.parse_args(argv)
    for name, low in (("steps", 1), ("warmup", 0), ("devices", 1), ("tokens_per_step", 1)):
        if getattr(args, name) < low:
            raise UserError(f"bench throughput: --{name} must be an integer >= {low}, got "
                            f"{getattr(args, name)}")
    bad = [n for n in args.lengths if args.tokens_per_step % n]
    if bad:
        raise UserError(f"bench throughput: --lengths {','.join(map(str, bad))} do not divide "
                        f"--tokens_per_step {args.tokens_per_step} (the batch is "
                        f"tokens_per_step / length)")
    return args


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON and a PNG."""
    args = parse_args(argv)
    from nl_jax.bench.memory import one_cpu_device_per_core
    if args.devices > 1:
        one_cpu_device_per_core(at_least=args.devices)
    import jax
    if args.devices > jax.device_count():
        raise UserError(f"bench throughput: --devices {args.devices}: only "
                        f"{jax.device_count()} {jax.default_backend()} devices are available")
    devices = jax.devices()[:args.devices]
    for name in args.models:     # every row's config, before the first compile
        for seq_len in args.lengths:
            checked_config(name, seq_len, args.tokens_per_step, len(devices), args.override)
    rows = []
    for name in args.models:
        for seq_len in sorted(args.lengths):
            rows.append(measure_row(name, seq_len, args.tokens_per_step, devices,
                                    args.warmup, args.steps, args.override))
            r = rows[-1]
            print(f"  {name} T={seq_len}: {r['tokens_per_s']:.1f} tokens/s "
                  f"(compiled in {r['compile_s']:.1f} s)", flush=True)
            if args.json:     # after every row: a long run stopped early keeps its rows
                png = write_results(args.json, summary(rows, devices, argv, args))
    result = summary(rows, devices, argv, args)
    print_table(rows, result["exponents"], result["device_layout"], args.override)
    if args.json:
        print(f"wrote {args.json} and {png}")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
