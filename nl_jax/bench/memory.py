"""``python -m nl_jax bench memory [--json PATH]``: oracle scan vs chunked dual form.

Full Titans rule (linear memory, L2 objective, per-token theta/eta/alpha,
momentum + weight decay, no DGD) at B=2, H=4, d=64, C=64, T in {2048, 8192}:
forward and forward+backward wall time of both paths, the achieved GFLOP/s,
and a dense 2048 x 2048 fp32 matmul measured in the same run for reference.
Other shapes: ``--lengths``, ``--batch``, ``--heads``, ``--dim``, ``--chunk``;
``--paths chunked`` skips the (slow) oracle, ``--paths oracle,chunked,kernel``
adds the Pallas kernel path (``kernels/linear_memory.py``: Mosaic on a TPU,
Triton on a CUDA GPU, Pallas interpret mode on the CPU, so its CPU figures say
nothing about speed); ``--trace DIR`` also records a
``jax.profiler`` trace of the chunked forward and forward+backward at the
first length (open it with TensorBoard's profile plugin or Perfetto).

Devices: both paths run under ``jit`` with their inputs sharded over a
``(data, tensor)`` mesh of ``--devices`` devices: heads over ``tensor`` and,
where the heads do not divide the devices, batch rows over ``data`` (heads
are independent, so the program has no collectives; batch rows share the
initial state, whose gradient is then summed across ``data``).  The default
is one device on an accelerator and one host device per core on the CPU:
XLA:CPU runs each batched GEMM of these shapes on a single thread, so one
CPU device leaves all but one core idle, while the dense reference (one
device, one large GEMM) uses them all.  ``--devices 1``: one device.  On an
accelerator with ``--devices N`` the "% dense" column compares with N times
the one-device dense figure.

FLOP counts (multiply-adds count 2), per (batch, head):

* chunked, per chunk of C tokens with d = d_k = d_v (the algorithm's useful
  matmuls; the gates' prefix-sum and last-row products, O(C^2), are not
  counted): G = La (Le theta) 2C^3, f = La m 2C^2; K M^T and Q M^T 4Cd^2,
  the two state updates K^T (E * g) 4Cd^2; outputs Q K^T 2C^2 d,
  ((QK^T) * G) E 2C^2 d and Q S^T 2Cd^2.  Total 2C^3 + 2C^2 + 10Cd^2 + 4C^2 d
  (the forward computes Q M^T and Q S^T as one GEMM Q [M | S]^T, the block
  differentiated in the backward K M^T and Q M^T as one [K; Q] M^T).
* oracle, per token: M k 2d^2, the outer-product gradient 2d^2, the S update
  3d^2, the M update 3d^2, M q 2d^2: 12 d^2.
* forward+backward counts 3x the forward FLOPs (backward ~ 2x forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from nl_jax.train.mesh import make_mesh

B, H, D, C = 2, 4, 64, 64
LENGTHS = (2048, 8192)
PATHS = ("oracle", "chunked", "kernel")
DEFAULT_PATHS = ("oracle", "chunked")


def chunked_flops(t: int, c: int = C, d: int = D, b: int = B, h: int = H) -> float:
    """Useful forward FLOPs of the chunked path (module docstring)."""
    per_chunk = 2 * c ** 3 + 2 * c ** 2 + 10 * c * d * d + 4 * c * c * d
    return float(b * h * (-(-t // c)) * per_chunk)


def oracle_flops(t: int, d: int = D, b: int = B, h: int = H) -> float:
    """Useful forward FLOPs of the per-token oracle scan (module docstring)."""
    return float(b * h * t * 12 * d * d)


def median_ms(fn, args, repeats: int) -> float:
    """Median wall time in ms of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def dense_matmul_gflops(repeats: int = 5) -> float:
    """GFLOP/s of one 2048 x 2048 fp32 matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    ms = median_ms(jax.jit(jnp.matmul), (a, b), repeats)
    return 2 * 2048 ** 3 / (ms * 1e-3) / 1e9


def inputs(t: int, b: int = B, h: int = H, d: int = D):
    """Unit-norm q, k, random v and sigmoid gates, ``[B, T, H, ...]``."""
    ks = jax.random.split(jax.random.PRNGKey(t), 6)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, t, h, d))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (b, t, h, d))
    theta = 0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
    eta = jax.nn.sigmoid(2.0 + jax.random.normal(ks[4], (b, t, h)))
    alpha = jax.nn.sigmoid(-4.0 + jax.random.normal(ks[5], (b, t, h)))
    return q, k, v, theta, eta, alpha


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # not on Linux
        return os.cpu_count() or 1


def one_cpu_device_per_core(at_least: int = 1) -> None:
    """Ask for one XLA:CPU device per core (or ``at_least``); takes effect only
    before JAX starts a backend, and not when ``XLA_FLAGS`` already sets a host
    device count.  Otherwise (e.g. inside the test suite) the devices that exist
    are used.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    with contextlib.suppress(RuntimeError):     # a backend is already running
        jax.config.update("jax_num_cpu_devices", max(cores(), at_least))


def splits(devices: int, b: int, h: int) -> bool:
    """Whether heads, then batch rows, split ``devices`` ways (see ``head_mesh``)."""
    return b % (devices // math.gcd(h, devices)) == 0


def default_devices(b: int, h: int) -> int:
    """One device on an accelerator; on the CPU one per core (module docstring), or
    fewer where batch x heads cannot be split that many ways."""
    if jax.default_backend() != "cpu":
        return 1
    most = min(cores(), jax.device_count())
    return max(n for n in range(1, most + 1) if splits(n, b, h))


def head_mesh(devices: int, b: int, h: int) -> jax.sharding.Mesh:
    """``(data, tensor)`` mesh (the trainer's ``make_mesh``): heads over ``tensor``,
    as many devices as divide H, then batch rows over ``data``; ValueError when
    that cannot use ``devices`` (``splits``).  Heads first: they share nothing,
    while batch rows share the initial state, whose gradient is then summed
    across devices."""
    if devices > jax.device_count():
        raise ValueError(f"--devices {devices}: only {jax.device_count()} "
                         f"{jax.default_backend()} devices are available")
    if not splits(devices, b, h):
        ok = [n for n in range(1, b * h + 1) if splits(n, b, h)]
        raise ValueError(f"--devices {devices}: the {h} heads and then the batch of {b} "
                         f"cannot be split {devices} ways; use one of {ok}")
    tensor = math.gcd(h, devices)
    return make_mesh({"data": devices // tensor, "tensor": tensor}, jax.devices()[:devices])


def place(mesh: jax.sharding.Mesh | None, params: dict, *arrays: jax.Array):
    """Params ``[H, ...]`` over ``tensor``; ``[B, T, H, ...]`` arrays over (data, tensor)."""
    if mesh is None:
        return (params,) + arrays

    def put(x, spec):
        return jax.device_put(x, NamedSharding(mesh, spec))
    params = jax.tree.map(lambda p: put(p, P("tensor")), params)
    return (params,) + tuple(put(x, P("data", None, "tensor")) for x in arrays)


def functions(path: str, t: int, b: int = B, h: int = H, d: int = D, c: int = C,
              mesh: jax.sharding.Mesh | None = None):
    """Jitted forward and forward+backward of one path, and their arguments
    (placed on ``mesh``'s devices, or left on the default device)."""
    spec = MemorySpec(kind="linear", objective="l2", momentum=True, weight_decay=True,
                      dgd=False, chunk_size=c, path=path)
    params = init_memory_params(spec, jax.random.PRNGKey(0), h, d, d)
    weights = jax.random.normal(jax.random.PRNGKey(7), (b, t, h, d))
    args = place(mesh, params, *inputs(t, b, h, d), weights)
    args, weights = args[:-1], args[-1]

    def forward(p, *x):
        return apply_memory(spec, p, *x)

    def loss(p, *x):
        return jnp.sum(weights * apply_memory(spec, p, *x)[0])

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(7)))), args


def measure(path: str, t: int, repeats: int, b: int = B, h: int = H, d: int = D,
            c: int = C, mesh: jax.sharding.Mesh | None = None) -> list[dict]:
    """fwd and fwd_bwd rows for one path and length."""
    fwd, fwd_bwd, args = functions(path, t, b, h, d, c, mesh)
    devices = 1 if mesh is None else mesh.size
    flops = oracle_flops(t, d, b, h) if path == "oracle" else chunked_flops(t, c, d, b, h)
    slow = path == "oracle" and t > 2048
    rows = []
    for mode, fn, scale in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.0)):
        ms = median_ms(fn, args, 1 if slow and mode == "fwd_bwd" else repeats)
        rows.append({"path": path, "T": t, "mode": mode, "ms": ms,
                     "gflops": scale * flops / (ms * 1e-3) / 1e9, "devices": devices})
    return rows


def record_trace(directory: str, t: int, b: int, h: int, d: int, c: int,
                 mesh: jax.sharding.Mesh | None = None) -> None:
    """A ``jax.profiler`` trace of three chunked fwd and fwd_bwd calls (after compiling)."""
    fwd, fwd_bwd, args = functions("chunked", t, b, h, d, c, mesh)
    for fn in (fwd, fwd_bwd):
        jax.block_until_ready(fn(*args))
    with jax.profiler.trace(directory):
        for fn in (fwd, fwd_bwd):
            for _ in range(3):
                jax.block_until_ready(fn(*args))


def int_list(text: str) -> list[int]:
    """``"2048,8192"`` -> [2048, 8192] (argparse type)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m nl_jax bench memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--lengths", type=int_list, default=list(LENGTHS),
                        help="sequence lengths T, comma-separated (default 2048,8192)")
    parser.add_argument("--batch", type=int, default=B)
    parser.add_argument("--heads", type=int, default=H)
    parser.add_argument("--dim", type=int, default=D, help="d_k = d_v per head")
    parser.add_argument("--chunk", type=int, default=C, help="chunk size C")
    parser.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                        help="comma-separated subset of oracle,chunked,kernel (default "
                             "oracle,chunked; kernel: the Pallas kernel, in interpret "
                             "mode on the CPU)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices to shard batch and heads over (default: one per "
                             "core on the CPU, one on an accelerator)")
    parser.add_argument("--trace", metavar="DIR",
                        help="also write a jax.profiler trace of the chunked path here")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths {args.paths!r}: choose from {','.join(PATHS)}")
    from kernels.linear_memory import BACKENDS
    if "kernel" in paths and jax.default_backend() not in BACKENDS:
        parser.error(f"--paths kernel: the memory kernel runs on TPUs and CUDA GPUs, not "
                     f"on {jax.default_backend()}; leave it out")
    for name in ("repeats", "batch", "heads", "dim", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be >= 1")
    one_cpu_device_per_core(at_least=args.devices or 1)
    devices = args.devices or default_devices(args.batch, args.heads)
    try:
        mesh = head_mesh(devices, args.batch, args.heads) if devices > 1 else None
    except ValueError as e:
        parser.error(str(e))
    shape = dict(b=args.batch, h=args.heads, d=args.dim, c=args.chunk)
    dense = dense_matmul_gflops()
    # the reference for "% dense": on the CPU one device already uses every core;
    # on accelerators each device is a chip of its own
    reference = dense * (devices if jax.default_backend() != "cpu" else 1)
    rows = []
    for t in args.lengths:
        for path in (p for p in PATHS if p in paths):
            rows.extend(measure(path, t, args.repeats, mesh=mesh, **shape))
    layout = (f"{devices} devices (batch over {mesh.shape['data']}, heads over "
              f"{mesh.shape['tensor']})" if mesh else "1 device")
    print(f"B={args.batch} H={args.heads} d={args.dim} C={args.chunk}, "
          f"{jax.devices()[0].platform}, {layout}")
    print(f"dense 2048x2048 fp32 matmul (1 device): {dense:.1f} GFLOP/s"
          + (f", x {devices} devices for % dense" if reference != dense else ""))
    print(f"{'path':8s} {'T':>6s} {'mode':8s} {'ms':>10s} {'GFLOP/s':>8s} "
          f"{'% dense':>8s} {'speedup':>8s}")
    oracle_ms = {(r["T"], r["mode"]): r["ms"] for r in rows if r["path"] == "oracle"}
    for r in rows:
        base = oracle_ms.get((r["T"], r["mode"]))
        speedup = f"{base / r['ms']:7.1f}x" if base else f"{'-':>8s}"
        print(f"{r['path']:8s} {r['T']:6d} {r['mode']:8s} {r['ms']:10.2f} "
              f"{r['gflops']:8.1f} {100 * r['gflops'] / reference:7.1f}% {speedup}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"dense_matmul_gflops": dense, "rows": rows,
                       "shape": {"B": args.batch, "H": args.heads, "d": args.dim,
                                 "C": args.chunk}, "devices": devices}, f, indent=2)
    if args.trace:
        record_trace(args.trace, args.lengths[0], mesh=mesh, **shape)
        print(f"trace of the chunked path at T={args.lengths[0]} in {args.trace}")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
