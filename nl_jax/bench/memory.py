"""``python -m nl_jax bench memory [--json PATH]``: oracle scan vs chunked dual form.

Full Titans rule (linear memory, L2 objective, per-token theta/eta/alpha,
momentum + weight decay, no DGD) at B=2, H=4, d=64, C=64, T in {2048, 8192}:
forward and forward+backward wall time of both paths, the achieved GFLOP/s,
and a dense 2048 x 2048 fp32 matmul measured in the same run for reference.

FLOP counts (multiply-adds count 2), per (batch, head):

* chunked, per chunk of C tokens with d = d_k = d_v (the algorithm's useful
  matmuls; the gates' prefix-sum and last-row products, O(C^2), are not
  counted): G = La (Le theta) 2C^3, f = La m 2C^2; in the scan [K; Q] M^T
  4Cd^2 and the two state updates K^T (E * g) 4Cd^2; outputs Q K^T 2C^2 d,
  ((QK^T) * G) E 2C^2 d and Q S^T 2Cd^2.  Total 2C^3 + 2C^2 + 10Cd^2 + 4C^2 d.
* oracle, per token: M k 2d^2, the outer-product gradient 2d^2, the S update
  3d^2, the M update 3d^2, M q 2d^2: 12 d^2.
* forward+backward counts 3x the forward FLOPs (backward ~ 2x forward).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from nl_jax.memory import MemorySpec, apply_memory, init_memory_params

B, H, D, C = 2, 4, 64, 64
LENGTHS = (2048, 8192)


def chunked_flops(t: int, c: int = C, d: int = D) -> float:
    """Useful forward FLOPs of the chunked path (module docstring)."""
    per_chunk = 2 * c ** 3 + 2 * c ** 2 + 10 * c * d * d + 4 * c * c * d
    return float(B * H * (-(-t // c)) * per_chunk)


def oracle_flops(t: int, d: int = D) -> float:
    """Useful forward FLOPs of the per-token oracle scan (module docstring)."""
    return float(B * H * t * 12 * d * d)


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


def inputs(t: int):
    """Unit-norm q, k, random v and sigmoid gates, ``[B, T, H, ...]``."""
    ks = jax.random.split(jax.random.PRNGKey(t), 6)
    q = jax.random.normal(ks[0], (B, t, H, D))
    k = jax.random.normal(ks[1], (B, t, H, D))
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, t, H, D))
    theta = 0.1 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, t, H)))
    eta = jax.nn.sigmoid(2.0 + jax.random.normal(ks[4], (B, t, H)))
    alpha = jax.nn.sigmoid(-4.0 + jax.random.normal(ks[5], (B, t, H)))
    return q, k, v, theta, eta, alpha


def measure(path: str, t: int, repeats: int) -> list[dict]:
    """fwd and fwd_bwd rows for one path and length."""
    spec = MemorySpec(kind="linear", objective="l2", momentum=True, weight_decay=True,
                      dgd=False, chunk_size=C, path=path)
    params = init_memory_params(spec, jax.random.PRNGKey(0), H, D, D)
    args = (params,) + inputs(t)
    weights = jax.random.normal(jax.random.PRNGKey(7), (B, t, H, D))

    def forward(p, *x):
        return apply_memory(spec, p, *x)

    def loss(p, *x):
        return jnp.sum(weights * apply_memory(spec, p, *x)[0])

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.grad(loss, argnums=tuple(range(7))))
    flops = chunked_flops(t) if path == "chunked" else oracle_flops(t)
    slow = path == "oracle" and t > 2048
    rows = []
    for mode, fn, scale in (("fwd", fwd, 1.0), ("fwd_bwd", fwd_bwd, 3.0)):
        ms = median_ms(fn, args, 1 if slow and mode == "fwd_bwd" else repeats)
        rows.append({"path": path, "T": t, "mode": mode, "ms": ms,
                     "gflops": scale * flops / (ms * 1e-3) / 1e9})
    return rows


def main(argv: list[str]) -> int:
    """Run the benchmark, print a table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m nl_jax bench memory",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    args = parser.parse_args(argv)
    dense = dense_matmul_gflops()
    rows = []
    for t in LENGTHS:
        for path in ("oracle", "chunked"):
            rows.extend(measure(path, t, args.repeats))
    print(f"dense 2048x2048 fp32 matmul: {dense:.1f} GFLOP/s")
    print(f"{'path':8s} {'T':>6s} {'mode':8s} {'ms':>10s} {'GFLOP/s':>8s} "
          f"{'% dense':>8s} {'speedup':>8s}")
    oracle_ms = {(r["T"], r["mode"]): r["ms"] for r in rows if r["path"] == "oracle"}
    for r in rows:
        speedup = oracle_ms[(r["T"], r["mode"])] / r["ms"]
        print(f"{r['path']:8s} {r['T']:6d} {r['mode']:8s} {r['ms']:10.2f} "
              f"{r['gflops']:8.1f} {100 * r['gflops'] / dense:7.1f}% {speedup:7.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_matmul_gflops": dense, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(main(sys.argv[1:]))
