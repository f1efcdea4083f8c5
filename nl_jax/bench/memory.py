"""``python -m nl_jax bench memory [--level L] [--json PATH]``: oracle scan vs chunked form.

Times one token-clock level of ``nl_jax/memory`` alone (no projections),
forward and forward+backward, on each of its paths (``--paths``), with the
achieved GFLOP/s and a dense 2048 x 2048 fp32 matmul measured in the same run
for reference.  ``--level`` (default ``titans_linear``):

* ``titans_linear``: the full Titans rule (linear memory, L2 objective,
  per-token theta/eta/alpha, momentum + weight decay, no DGD) at B=2, H=4,
  d=64, C=64; paths oracle, chunked, kernel.
* ``titans_mlp``: the same rule on Titans' deep memory (``MemorySpec(kind="mlp")``,
  two layers, hidden = ``--expansion`` x d) at B=2, H=4, d=64, expansion 4,
  C=64; paths oracle, chunked.
* ``hope``: Hope's self-modifying memories (``memory/self_modifying.py``: the
  adaptive k, v, eta, alpha memories and the main memory, MLP memories, DGD,
  momentum, retention; the options of ``models/self_modifying.py`` with
  hidden_mult = ``--expansion``) at B=2, H=4, d=64, expansion 1, C=32 (the
  adaptive memories' chunk), ``--memory-chunk`` 16 (the main memory's);
  paths oracle, chunked.
* ``cms``: an in-context CMS level (``memory/cms.py``: a SwiGLU block of
  d_model ``--dim`` and d_ff ``--expansion`` x d_model, updated every
  ``--chunk`` tokens, trust-ratio bound 0.005) at B=2, d_model 256, d_ff 1024,
  period 32.  It has no per-token oracle (its chunk IS its period): its only
  path is the one-pass form, ``chunked``, which is its own reference.

Lengths ``--lengths`` (default 2048, 8192); other shapes ``--batch``,
``--heads``, ``--dim``, ``--chunk``, ``--expansion``, ``--memory-chunk`` (a
flag that a level does not have is refused).  ``--paths chunked`` skips the
(slow) oracle, ``--paths oracle,chunked,kernel`` adds the chunk-scan kernel
path of every level but ``cms`` (``kernels/chunk_scan.py``, forward and
backward: Mosaic on a TPU, Triton on a CUDA GPU for ``titans_linear`` and the
jnp reference scan there for the others; on the CPU it runs in Pallas
interpret mode, which times the interpreter, not a kernel); every row records
the ``device_kind`` it ran on; ``--trace DIR`` also records a
``jax.profiler`` trace of the chunked forward and forward+backward at the
first length (open it with TensorBoard's profile plugin or Perfetto).
``fwd_bwd`` is the gradient of a weighted sum of the outputs w.r.t. every
input (vectors and gates) and the level's initial state (the outer-level
initial weights; Hope's gate read-outs; the CMS learning-rate projection).

Timing: each function is compiled first; a row is the median of
``--repeats`` calls after one warm-up call, or, when that first call takes
over a second (the per-token oracles' backward), that one call alone.  The
per-token oracles' backward of ``titans_mlp`` and ``hope`` is slow and grows
linearly with T (a sequential scan of small products; on the 2-core CPU,
shared with other jobs, about 5 s per call at T=512 for ``titans_mlp`` and
6 s at T=256 for ``hope``: tens of seconds at T=2048, minutes at 8192), so
their ``oracle fwd_bwd`` rows are measured only up to
``--oracle-bwd-max-length`` (default 2048 for them; no limit for
``titans_linear``, whose oracle backward takes about 2 s at T=8192 on the
CPU); a skipped row is named in the table and the JSON (``skipped``), and
``--oracle-bwd-max-length 0`` measures every length.

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
the one-device dense figure.  ``cms`` has no heads: its batch rows go over
``data`` and its weights are replicated.

FLOP counts (multiply-adds count 2), ``titans_linear``, per (batch, head):

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

``titans_mlp``, ``hope`` and ``cms`` count the useful work of the level's
chunked algorithm as the model FLOP count does (``nl_jax/models/flops.py``:
matrix products only; the last chunk's state update, which only a streaming
continuation reads, not counted), the same count for every path: an oracle
row's GFLOP/s is the rate at which it does the chunked form's work.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from nl_jax.memory import cms as cms_engine
from nl_jax.memory import self_modifying as hope_engine
from nl_jax.models import flops as model_flops
from nl_jax.train.mesh import make_mesh

B, H, D, C = 2, 4, 64, 64
LENGTHS = (2048, 8192)
PATHS = ("oracle", "chunked", "kernel")
DEFAULT_PATHS = ("oracle", "chunked")
LEVELS = ("titans_linear", "titans_mlp", "hope", "cms", "deltanet", "gated_deltanet")
HOPE_ENGINE_LEVELS = ("hope", "deltanet", "gated_deltanet")   # memory/self_modifying.py
LEVEL_PATHS = {"titans_linear": PATHS, "titans_mlp": PATHS, "hope": PATHS,
               "cms": ("chunked",), "deltanet": PATHS, "gated_deltanet": PATHS}
# Default shape of each level: batch b, heads h, head (cms: model) dim d, chunk c
# (cms: the period), hidden width = expansion x d, Hope's main-memory chunk.
SHAPES = {"titans_linear": dict(b=B, h=H, d=D, c=C),
          "titans_mlp": dict(b=2, h=4, d=64, c=64, expansion=4),
          "hope": dict(b=2, h=4, d=64, c=32, expansion=1, memory_chunk=16),
          "cms": dict(b=2, d=256, c=32, expansion=4),
          "deltanet": dict(b=2, h=4, d=64, memory_chunk=64),
          "gated_deltanet": dict(b=2, h=4, d=64, memory_chunk=64)}
SHAPE_FLAGS = {"b": "batch", "h": "heads", "d": "dim", "c": "chunk",
               "expansion": "expansion", "memory_chunk": "memory-chunk"}
SHAPE_KEYS = {"b": "B", "h": "H", "d": "d", "c": "C", "expansion": "expansion",
              "memory_chunk": "memory_C"}   # the JSON's "shape" names
# oracle fwd_bwd rows are measured up to this T by default (0: no limit)
ORACLE_BWD_MAX_LENGTH = {"titans_linear": 0, "titans_mlp": 2048, "hope": 2048, "cms": 0,
                         "deltanet": 0, "gated_deltanet": 0}
CMS_LR = 1e-2        # models/cms.py's default cms.lr
SLOW_S = 1.0         # a first call this long is the row's only timed call


def chunked_flops(t: int, c: int = C, d: int = D, b: int = B, h: int = H) -> float:
    """Useful forward FLOPs of the chunked path (module docstring)."""
    per_chunk = 2 * c ** 3 + 2 * c ** 2 + 10 * c * d * d + 4 * c * c * d
    return float(b * h * (-(-t // c)) * per_chunk)


def oracle_flops(t: int, d: int = D, b: int = B, h: int = H) -> float:
    """Useful forward FLOPs of the per-token oracle scan (module docstring)."""
    return float(b * h * t * 12 * d * d)


def titans_spec(kind: str, path: str, c: int, expansion: int = 2) -> MemorySpec:
    """The Titans rule the benchmark times (module docstring)."""
    return MemorySpec(kind=kind, objective="l2", momentum=True, weight_decay=True,
                      dgd=False, mlp_expansion=expansion, chunk_size=c, path=path)


def hope_spec(path: str, c: int, expansion: int, memory_chunk: int, level: str = "hope"):
    """(engine spec, model options) of Hope's memories: ``models/self_modifying.py``'s
    defaults with MLP memories of hidden_mult ``expansion`` and the given chunks;
    for a baseline level (``deltanet``, ``gated_deltanet``) its preset
    (``models/baselines.py``: a linear memory, one chunk size ``memory_chunk``)."""
    from nl_jax.models import lm
    from nl_jax.models.self_modifying import DEFAULTS, spec_from_options
    if level == "hope":
        options = {**DEFAULTS, "path": path, "memory": "mlp", "hidden_mult": expansion,
                   "chunk_size": c, "memory_chunk_size": memory_chunk}
    else:
        preset = lm._resolve(lm.MIXERS, "mixer", level).PRESET
        options = {**DEFAULTS, **preset, "path": path, "chunk_size": memory_chunk,
                   "memory_chunk_size": memory_chunk}
    return spec_from_options(options), options


def level_flops(level: str, path: str, t: int, b: int, d: int, c: int, h: int = 1,
                expansion: int = 2, memory_chunk: int = 16) -> float:
    """Forward FLOPs of one call (module docstring)."""
    if level == "titans_linear":
        return oracle_flops(t, d, b, h) if path == "oracle" else chunked_flops(t, c, d, b, h)
    if level == "titans_mlp":
        work = model_flops.chunked(t, c, *model_flops.titans_memory_chunk(
            titans_spec("mlp", path, c, expansion), c, d))
    elif level in HOPE_ENGINE_LEVELS:
        options = hope_spec(path, c, expansion, memory_chunk, level)[1]
        work = (model_flops.chunked(t, c, *model_flops.hope_stage1_chunk(options, d))
                + model_flops.chunked(t, memory_chunk,
                                      *model_flops.hope_stage2_chunk(options, d)))
    else:
        work = model_flops.cms_level_flops(d, t, c, "swiglu", expansion * d, "input")
    return float(b * h * work)


def median_ms(fn, args, repeats: int) -> float:
    """Median wall time in ms of ``fn(*args)`` after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def call_ms(fn, args, repeats: int, slow_s: float = SLOW_S) -> float:
    """Wall time in ms of the jitted ``fn(*args)``, compiled first: the median of
    ``repeats`` calls after a warm-up call, or that first call alone when it
    takes ``slow_s`` seconds or more."""
    compiled = fn.lower(*args).compile()
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
        if times[0] >= slow_s:
            return 1e3 * times[0]
    return 1e3 * statistics.median(times[1:])


def dense_matmul_gflops(repeats: int = 5) -> float:
    """GFLOP/s of one 2048 x 2048 fp32 matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (2048, 2048), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (2048, 2048), jnp.float32)
    ms = median_ms(jax.jit(jnp.matmul), (a, b), repeats)
    return 2 * 2048 ** 3 / (ms * 1e-3) / 1e9


def normal(rng: np.random.Generator, shape, scale: float = 1.0, shift: float = 0.0):
    """``shift + scale * N(0, 1)`` fp32 (NumPy: no small XLA programs to compile)."""
    return (shift + scale * rng.standard_normal(shape)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def on_device(tree):
    """NumPy leaves as device arrays (so that timed calls do not transfer them)."""
    return jax.tree.map(jnp.asarray, tree)


def inputs(t: int, b: int = B, h: int = H, d: int = D):
    """Unit-norm q, k, random v and sigmoid gates, ``[B, T, H, ...]``."""
    rng = np.random.default_rng(t)
    q, k, v = (normal(rng, (b, t, h, d)) for _ in range(3))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    theta = 0.1 * sigmoid(normal(rng, (b, t, h)))
    eta = sigmoid(normal(rng, (b, t, h), shift=2.0))
    alpha = sigmoid(normal(rng, (b, t, h), shift=-4.0))
    return on_device((q, k, v, theta, eta, alpha))


def titans_level(kind: str, path: str, t: int, b: int, h: int, d: int, c: int,
                 expansion: int = 2):
    """(forward, initial weights, inputs) of a Titans memory (``apply_memory``)."""
    spec = titans_spec(kind, path, c, expansion)
    # one jitted program rather than a handful of eager ones
    init = jax.jit(init_memory_params, static_argnums=(0, 2, 3, 4))
    params = init(spec, jax.random.PRNGKey(0), h, d, d)
    return functools.partial(apply_memory, spec), params, inputs(t, b, h, d)


def hope_level(path: str, t: int, b: int, h: int, d: int, c: int, expansion: int,
               memory_chunk: int, level: str = "hope"):
    """(forward, outer-level weights, inputs) of Hope's self-modifying memories,
    built as ``models/self_modifying.py`` builds them: every memory's initial
    weights ``{"w1": [H, d, hidden], "w2": [H, hidden, d]}`` (its init scales),
    the adaptive gates' read-outs ``(r [H, d], b [H])``; inputs u and the plain
    q ``[B, T, H, d]``, the log momentum gate ``[B, T, H]``."""
    spec = hope_spec(path, c, expansion, memory_chunk, level)[0]
    hidden = expansion * d
    rng = np.random.default_rng(t)
    if spec.kind in ("linear", "linear_ln"):
        weights = {box: {"w": normal(rng, (h, d, d), d ** -0.5)}
                   for box in spec.adaptive + ("memory",)}
    else:
        weights = {box: {"w2": normal(rng, (h, hidden, d), d ** -0.5),
                         "w1": normal(rng, (h, d, hidden), 0.1 * hidden ** -0.5)}
                   for box in spec.adaptive + ("memory",)}
    bias = {"eta": -2.0, "alpha": 4.0}
    readout = {box: (normal(rng, (h, d), d ** -0.5), np.full((h,), bias[box], np.float32))
               for box in hope_engine.GATE_BOXES if box in spec.adaptive}
    plain = {box: normal(rng, (b, t, h, d)) for box in spec.plain_vectors}
    plain.update({box: normal(rng, (b, t, h), shift=bias[box]) for box in spec.plain_gates})
    log_beta = (np.log(sigmoid(normal(rng, (b, t, h), shift=2.0))) if spec.momentum
                else None)

    def forward(params, u, plain, log_beta):
        state = hope_engine.initial_state(spec, params["weights"], u.shape[0])
        return hope_engine.apply_self_modifying(spec, state, u, plain, log_beta,
                                                params["readout"], streaming=False)

    return forward, on_device({"weights": weights, "readout": readout}), on_device(
        (normal(rng, (b, t, h, d)), plain, log_beta))


def cms_level(t: int, b: int, d: int, c: int, expansion: int):
    """(forward, outer-level weights, input) of an in-context SwiGLU CMS level:
    weights gate, up ``[d, F]``, down ``[F, d]`` and the learning-rate projection
    (eta_t = lr sigmoid(w . x_t + b), ``w, b`` zero as at init), target x_t."""
    spec = cms_engine.CMSLevelSpec(block="swiglu", period=c)
    f = expansion * d
    rng = np.random.default_rng(t)
    weights = {"gate": normal(rng, (d, f), d ** -0.5), "up": normal(rng, (d, f), d ** -0.5),
               "down": normal(rng, (f, d), f ** -0.5)}
    params = {"weights": weights, "lr_w": np.zeros((d,), np.float32),
              "lr_b": np.zeros((), np.float32)}

    def forward(params, x):
        def learning_rate(x_c):
            return CMS_LR * jax.nn.sigmoid(x_c @ params["lr_w"] + params["lr_b"])
        return cms_engine.apply_level(spec, params["weights"], x, learning_rate,
                                      lambda x_c: x_c)

    return forward, on_device(params), on_device((normal(rng, (b, t, d)),))


def level_setup(level: str, path: str, t: int, b: int, d: int, c: int, h: int = 1,
                expansion: int = 2, memory_chunk: int = 16):
    """(forward(params, *inputs) -> (y, state), params, inputs) of one level; y has
    the shape of the first input."""
    if level in ("titans_linear", "titans_mlp"):
        return titans_level(level.split("_")[1], path, t, b, h, d, c, expansion)
    if level in HOPE_ENGINE_LEVELS:
        return hope_level(path, t, b, h, d, c, expansion, memory_chunk, level)
    return cms_level(t, b, d, c, expansion)


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
        what = f"the {h} heads and then the batch of {b}" if h > 1 else f"the batch of {b}"
        raise ValueError(f"--devices {devices}: {what} cannot be split {devices} ways; "
                         f"use one of {ok}")
    tensor = math.gcd(h, devices)
    return make_mesh({"data": devices // tensor, "tensor": tensor}, jax.devices()[:devices])


def place(mesh: jax.sharding.Mesh | None, params, *arrays, heads: bool = True):
    """Params (leaves ``[H, ...]``) over ``tensor``; inputs (pytrees of leaves
    ``[B, T, H, ...]``) over (data, tensor).  ``heads`` False (cms): inputs
    ``[B, T, d]`` over data, params replicated."""
    if mesh is None:
        return (params,) + arrays

    def put(tree, spec):
        return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec)), tree)
    params = put(params, P("tensor") if heads else P())
    spec = P("data", None, "tensor") if heads else P("data")
    return (params,) + tuple(put(x, spec) for x in arrays)


def functions(path: str, t: int, b: int = B, h: int = H, d: int = D, c: int = C,
              mesh: jax.sharding.Mesh | None = None, level: str = "titans_linear",
              **extra):
    """Jitted forward and forward+backward of one level's path, and their arguments
    ``(params, *inputs)`` (placed on ``mesh``'s devices, or left on the default
    device).  The backward is the gradient of a weighted sum of the outputs
    w.r.t. every argument: initial weights and all inputs."""
    if level == "cms":
        h = 1
    forward, params, xs = level_setup(level, path, t, b=b, h=h, d=d, c=c, **extra)
    weights = on_device(normal(np.random.default_rng(7), xs[0].shape))   # y's shape
    args = place(mesh, params, *xs, weights, heads=level != "cms")
    args, weights = args[:-1], args[-1]

    def loss(p, *x):
        return jnp.sum(weights * forward(p, *x)[0])

    return (jax.jit(forward), jax.jit(jax.grad(loss, argnums=tuple(range(len(args))))),
            args)


def measure(path: str, t: int, repeats: int, b: int = B, h: int = H, d: int = D,
            c: int = C, mesh: jax.sharding.Mesh | None = None,
            level: str = "titans_linear", modes=("fwd", "fwd_bwd"), **extra) -> list[dict]:
    """One row per mode (``fwd``, ``fwd_bwd``) for one path and length."""
    fwd, fwd_bwd, args = functions(path, t, b, h, d, c, mesh, level, **extra)
    devices = 1 if mesh is None else mesh.size
    flops = level_flops(level, path, t, b, d, c, h if level != "cms" else 1, **extra)
    rows = []
    for mode, fn, scale in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.0)):
        if mode in modes:
            ms = call_ms(fn, args, repeats)
            rows.append({"level": level, "path": path, "T": t, "mode": mode, "ms": ms,
                         "gflops": scale * flops / (ms * 1e-3) / 1e9, "devices": devices,
                         "device_kind": jax.devices()[0].device_kind})
    return rows


def record_trace(directory: str, t: int, mesh: jax.sharding.Mesh | None = None,
                 level: str = "titans_linear", **shape) -> None:
    """A ``jax.profiler`` trace of three chunked fwd and fwd_bwd calls (after compiling)."""
    fwd, fwd_bwd, args = functions("chunked", t, mesh=mesh, level=level, **shape)
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


def describe(level: str, shape: dict) -> str:
    """The shape line of the table, e.g. ``B=2 H=4 d=64 C=64``."""
    if level == "cms":
        return (f"B={shape['b']} d_model={shape['d']} d_ff={shape['expansion'] * shape['d']}"
                f" period={shape['c']}")
    text = " ".join(f"{SHAPE_KEYS[k]}={v}" for k, v in shape.items())
    return text + (f" (hidden {shape['expansion'] * shape['d']})" if "expansion" in shape
                   else "")


def json_shape(level: str, shape: dict) -> dict:
    """The JSON's ``shape``: ``{"B", "H", "d", "C"}`` and the level's other sizes."""
    out = {SHAPE_KEYS[k]: v for k, v in shape.items()}
    if level == "cms":
        out["d_ff"] = shape["expansion"] * shape["d"]
    return out


def print_speedups(level: str, rows: list[dict], lengths: list[int]) -> None:
    """Per length, the chunked path's speed relative to the oracle's."""
    if level == "cms":
        print("cms: no per-token oracle (its chunk is its period); the one-pass form "
              "(chunked) is the level's reference")
        return
    ms = {(r["path"], r["T"], r["mode"]): r["ms"] for r in rows}
    if not any(p == "oracle" for p, _, _ in ms) or not any(p == "chunked" for p, _, _ in ms):
        return
    print("chunked vs oracle (oracle ms / chunked ms):")
    print(f"{'level':14s} {'T':>6s} {'fwd':>8s} {'fwd_bwd':>8s}")
    for t in lengths:
        cells = []
        for mode in ("fwd", "fwd_bwd"):
            oracle, chunked = ms.get(("oracle", t, mode)), ms.get(("chunked", t, mode))
            cells.append(f"{oracle / chunked:7.1f}x" if oracle and chunked else f"{'-':>8s}")
        print(f"{level:14s} {t:6d} {cells[0]} {cells[1]}")


def parse(argv: list[str]):
    """(parser, args, level, paths, shape, oracle_bwd_max_length); bad flags exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m nl_jax bench memory", description=__doc__.splitlines()[0],
        epilog="Levels and their paths: titans_linear (oracle, chunked, kernel), "
               "titans_mlp (oracle, chunked), hope (oracle, chunked), cms (chunked only: "
               "no per-token oracle, its chunk is its period, so the one-pass form is "
               "its reference).  The per-token oracles of titans_mlp and hope take tens "
               "of seconds or more per forward+backward call at T=2048; see "
               "--oracle-bwd-max-length.  Module docstring: nl_jax/bench/memory.py.")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--level", default="titans_linear",
                        help="the token-clock level: " + ", ".join(LEVELS)
                             + " (default titans_linear)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--lengths", type=int_list, default=list(LENGTHS),
                        help="sequence lengths T, comma-separated (default 2048,8192)")
    parser.add_argument("--batch", type=int, default=None, help="batch rows (default 2)")
    parser.add_argument("--heads", type=int, default=None,
                        help="heads (default 4; cms has none)")
    parser.add_argument("--dim", type=int, default=None,
                        help="d_k = d_v per head (default 64; cms: d_model, default 256)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="chunk size C (defaults: titans 64; hope 32, the adaptive "
                             "memories'; cms 32, its period)")
    parser.add_argument("--expansion", type=int, default=None,
                        help="hidden width = expansion x dim: titans_mlp's mlp_expansion "
                             "(default 4), hope's hidden_mult (1), cms d_ff / d_model (4)")
    parser.add_argument("--memory-chunk", type=int, default=None,
                        help="hope: the main memory's chunk (default 16)")
    parser.add_argument("--paths", default=None,
                        help="comma-separated subset of the level's paths oracle, chunked, "
                             "kernel (default oracle,chunked, cms chunked; kernel: the "
                             "chunk-scan Pallas kernels, forward and backward: a TPU or "
                             "CUDA GPU, or interpreted on the CPU)")
    parser.add_argument("--oracle-bwd-max-length", type=int, default=None, metavar="T",
                        help="measure oracle fwd_bwd only at lengths <= T (default 2048 for "
                             "titans_mlp and hope, whose per-token backward is slow; 0 = "
                             "every length, the default for titans_linear)")
    parser.add_argument("--devices", type=int, default=None,
                        help="devices to shard batch and heads over (default: one per "
                             "core on the CPU, one on an accelerator)")
    parser.add_argument("--trace", metavar="DIR",
                        help="also write a jax.profiler trace of the chunked path here")
    args = parser.parse_args(argv)
    level = args.level
    if level not in LEVELS:
        parser.error(f"--level {level!r}: choose one of {','.join(LEVELS)}")
    paths = ([p for p in args.paths.split(",") if p] if args.paths is not None
             else [p for p in DEFAULT_PATHS if p in LEVEL_PATHS[level]])
    if not paths or set(paths) - set(PATHS):
        parser.error(f"--paths {args.paths!r}: choose from {','.join(PATHS)}")
    for path in paths:
        if path not in LEVEL_PATHS[level]:
            why = (" (the in-context CMS levels have no kernel yet)" if path == "kernel"
                   else " (no per-token oracle: its chunk is its period, so the one-pass "
                   "form is its reference)" if level == "cms" else "")
            parser.error(f"--paths {path}: the {level} level has no {path} path{why}; "
                         f"its paths are {','.join(LEVEL_PATHS[level])}")
    from nl_jax_kernels.linear_memory import BACKENDS
    if "kernel" in paths and jax.default_backend() not in BACKENDS:
        parser.error(f"--paths kernel: the memory kernel runs on TPUs and CUDA GPUs, not "
                     f"on {jax.default_backend()}; leave it out")
    shape = dict(SHAPES[level])
    for key, flag in SHAPE_FLAGS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if key not in shape:
            parser.error(f"--{flag}: the {level} level has no such size; its sizes are "
                         + ", ".join(f"--{SHAPE_FLAGS[k]}" for k in shape))
        if value < 1:
            parser.error(f"--{flag} must be >= 1")
        shape[key] = value
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.devices is not None and args.devices < 1:
        parser.error("--devices must be >= 1")
    bwd_max = args.oracle_bwd_max_length
    if bwd_max is not None and bwd_max < 0:
        parser.error("--oracle-bwd-max-length must be >= 0 (0: no limit)")
    return (parser, args, level, paths, shape,
            ORACLE_BWD_MAX_LENGTH[level] if bwd_max is None else bwd_max)


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON."""
    parser, args, level, paths, shape, bwd_max = parse(argv)
    one_cpu_device_per_core(at_least=args.devices or 1)
    b, h = shape["b"], shape.get("h", 1)
    devices = args.devices or default_devices(b, h)
    try:
        mesh = head_mesh(devices, b, h) if devices > 1 else None
    except ValueError as e:
        parser.error(str(e))
    dense = dense_matmul_gflops()
    # the reference for "% dense": on the CPU one device already uses every core;
    # on accelerators each device is a chip of its own
    reference = dense * (devices if jax.default_backend() != "cpu" else 1)
    rows, skipped = [], []
    for t in args.lengths:
        for path in (p for p in PATHS if p in paths):
            modes = ("fwd", "fwd_bwd")
            if path == "oracle" and bwd_max and t > bwd_max:
                modes = ("fwd",)
                skipped.append({"level": level, "path": path, "T": t, "mode": "fwd_bwd",
                                "reason": f"T > --oracle-bwd-max-length {bwd_max}"})
            rows.extend(measure(path, t, args.repeats, mesh=mesh, level=level,
                                modes=modes, **shape))
    if mesh is None:
        layout = "1 device"
    elif level == "cms":
        layout = f"{devices} devices (batch over {mesh.shape['data']})"
    else:
        layout = (f"{devices} devices (batch over {mesh.shape['data']}, heads over "
                  f"{mesh.shape['tensor']})")
    print(f"level {level}: {describe(level, shape)}, {jax.devices()[0].platform}, {layout}")
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
    for s in skipped:
        print(f"{s['path']:8s} {s['T']:6d} {s['mode']:8s} skipped: {s['reason']}")
    print_speedups(level, rows, args.lengths)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"level": level, "dense_matmul_gflops": dense, "rows": rows,
                       "skipped": skipped, "shape": json_shape(level, shape),
                       "devices": devices}, f, indent=2)
    if args.trace:
        record_trace(args.trace, args.lengths[0], mesh=mesh, level=level, **shape)
        print(f"trace of the chunked path at T={args.lengths[0]} in {args.trace}")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
