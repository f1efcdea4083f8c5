"""Public entry points of the per-token memory: init, initial state, apply.

``apply_memory`` runs the rule of ``MemorySpec`` on ``[B, T, H, d]`` inputs with
per-token gates ``[B, T, H]`` by the path ``spec.path`` (the oracle scan, the
chunked dual form, or the chunked dual form with its recurrence in the Pallas
kernel of ``kernels/linear_memory.py``) and returns the outputs and
the final state, which can be passed to the next segment of the sequence.

Padding: T need not be a multiple of C.  The last chunk is padded with
theta = 0, eta = 1, alpha = 0 and zero q, k, v; the padded tokens come after
every real token, so they change no output, and the state is read at the last
real token (a padded token with theta = 0 still adds S to M, so it is not
applied).  Streaming segment by segment equals one pass when every segment
but the last has a length that is a multiple of C (chunk boundaries must line
up); the Titans layers (``models.titans.stream_aligned``) lift that condition
by re-running the inputs since the last multiple.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nl_jax.errors import ConfigError
from nl_jax.memory import kernel_path, linear_chunked, maps
from nl_jax.memory.chunked import chunked_head, kernel_heads
from nl_jax.memory.layout import (
    from_chunk_major,
    from_chunks,
    pad_tokens,
    to_chunk_major,
    to_chunks,
)
from nl_jax.memory.oracle import oracle_head
from nl_jax.memory.spec import MemorySpec, MemoryState


def check_dims(spec: MemorySpec, d_k: int, d_v: int) -> None:
    """An MLP memory is residual: it needs d_k == d_v."""
    if spec.kind == "mlp" and d_k != d_v:
        raise ConfigError(f"memory kind='mlp' is residual and needs d_k == d_v, "
                          f"got d_k={d_k}, d_v={d_v}; use kind='linear' or equal dims")


def init_memory_params(spec: MemorySpec, key: jax.Array, num_heads: int, d_k: int,
                       d_v: int) -> dict:
    """Initial memory weights ``{"w<l>": [H, out, in]}`` (fp32), see ``maps.init_weights``."""
    check_dims(spec, d_k, d_v)
    return maps.init_weights(spec, key, num_heads, d_k, d_v)


def initial_state(spec: MemorySpec, init_params: dict, batch_size: int) -> MemoryState:
    """The state at the start of a sequence: ``init_params`` for every batch row, S = 0."""
    params = jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.float32)[None],
                                   (batch_size,) + p.shape), init_params)
    return MemoryState(params=params, momentum=jax.tree.map(jnp.zeros_like, params))


def check_inputs(q, k, v, gates=()) -> tuple[int, int, int, int, int]:
    """(B, T, H, d_k, d_v) of ``[B, T, H, d]`` inputs, or ConfigError."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ConfigError(f"memory q and k must both be [B, T, H, d_k], got {q.shape} "
                          f"and {k.shape}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ConfigError(f"memory v must be [B, T, H, d_v] with q's B, T, H {q.shape[:3]},"
                          f" got {v.shape}")
    for name, g in gates:
        if g.shape != q.shape[:3]:
            raise ConfigError(f"memory gate {name} must be [B, T, H] = {q.shape[:3]}, "
                              f"got {g.shape}")
    b, t, h, d_k = q.shape
    return b, t, h, d_k, v.shape[-1]


def apply_memory(spec: MemorySpec, init_params: dict, q: jax.Array, k: jax.Array,
                 v: jax.Array, theta: jax.Array, eta: jax.Array, alpha: jax.Array,
                 state: MemoryState | None = None, interpret: bool | None = None
                 ) -> tuple[jax.Array, MemoryState]:
    """Run the memory rule over a segment (Titans Eq. 13-14 and 16-18, NL Eq. 57).

    Args:
      spec: the memory level.
      init_params: initial weights ``[H, ...]`` (used when ``state`` is None).
      q, k: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]``.
      theta, eta, alpha: ``[B, T, H]`` in (0, 1): inner learning rate, momentum
        decay, forget rate (M_t = (1 - alpha_t) M_{t-1} + S_t).
      state: the state after the previous segment, or None for a fresh memory;
        kept in fp32 (a lower-precision state passed in is upcast).
      interpret: ``path="kernel"`` only: None runs the kernels compiled on a TPU
        or CUDA GPU and in Pallas interpret mode on the CPU; True forces
        interpret mode (tests).

    Returns:
      y ``[B, T, H, d_v]`` fp32 with y_t = M_t(q_t), and the final state.
    """
    b, t, _, d_k, d_v = check_inputs(q, k, v, (("theta", theta), ("eta", eta),
                                                ("alpha", alpha)))
    spec = spec.resolved()
    check_dims(spec, d_k, d_v)
    if state is None:
        state = initial_state(spec, init_params, b)
    else:
        state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), state)
    c = spec.chunk_size
    n = -(-t // c)
    if spec.path == "chunked" and linear_chunked.supports(spec):
        args = (pad_tokens(q, c, 0.0), pad_tokens(k, c, 0.0), pad_tokens(v, c, 0.0),
                pad_tokens(theta, c, 0.0), pad_tokens(eta, c, 1.0), pad_tokens(alpha, c, 0.0))
        y, (w_end, s_end) = linear_chunked.linear_chunked(
            spec, state.params["w0"], state.momentum["w0"], *args, t)
        return y[:, :t], MemoryState(params={"w0": w_end}, momentum={"w0": s_end})
    if spec.path == "kernel" and linear_chunked.supports(spec):
        args = (to_chunk_major(q, c, 0.0), to_chunk_major(k, c, 0.0),
                to_chunk_major(v, c, 0.0), to_chunk_major(theta, c, 0.0),
                to_chunk_major(eta, c, 1.0), to_chunk_major(alpha, c, 0.0))
        y, (w_end, s_end) = linear_chunked.linear_kernel(
            spec, state.params["w0"], state.momentum["w0"], *args, t, interpret=interpret)
        return from_chunk_major(y, t), MemoryState(params={"w0": w_end},
                                                   momentum={"w0": s_end})
    if spec.path == "kernel":
        kernel_path.require_backend("model.memory.path", interpret)
        args = (to_chunk_major(q, c, 0.0), to_chunk_major(k, c, 0.0),
                to_chunk_major(v, c, 0.0), to_chunk_major(theta, c, 0.0),
                to_chunk_major(eta, c, 1.0), to_chunk_major(alpha, c, 0.0))
        n_valid = jnp.asarray(np.clip(t - np.arange(n) * c, 0, c).astype(np.int32))

        def run(states, xs):
            weights, momentum = states
            return kernel_heads(spec, weights, momentum, *xs, n_valid, interpret=interpret)

        y, (w_end, s_end) = kernel_path.on_local_shards(
            run, (maps.to_weights(state.params), maps.to_weights(state.momentum)), args)
        return from_chunk_major(y, t), MemoryState(params=maps.to_params(w_end),
                                                   momentum=maps.to_params(s_end))
    args = (to_chunks(q, c, 0.0), to_chunks(k, c, 0.0), to_chunks(v, c, 0.0),
            to_chunks(theta, c, 0.0), to_chunks(eta, c, 1.0), to_chunks(alpha, c, 0.0))
    weights = maps.to_weights(state.params)
    momentum = maps.to_weights(state.momentum)
    if spec.path == "oracle":
        extra = jnp.asarray((np.arange(n * c) < t).reshape(n, c))
        head = functools.partial(oracle_head, spec)
    else:
        extra = jnp.asarray(np.clip(t - np.arange(n) * c, 0, c).astype(np.int32))
        head = functools.partial(chunked_head, spec)
    per_head = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None))
    y, (w_end, s_end) = per_batch(weights, momentum, *args, extra)
    return from_chunks(y, t), MemoryState(params=maps.to_params(w_end),
                                          momentum=maps.to_params(s_end))
