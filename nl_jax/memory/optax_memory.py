"""A memory trained in context by any optax inner optimizer, once per chunk.

For chunk c with memory weights P_c (chunk-start state) and optimizer state O_c:

    g_c = sum_{t in c} grad_P l(P_c; k_t, v_t)   [+ the DGD term of each token]
    U, O_{c+1} = inner_opt.update(g_c, O_c, P_c);  P_{c+1} = P_c + U
    y_t = P_c(q_t)   for t in c

This is the CMS / mini-batch form of an inner level (NL Eq. 71): the level's
weights change only at chunk boundaries, so a token reads the weights left by
the previous chunks.  (A token cannot read its own chunk's update without
seeing later tokens of the chunk; compare ``apply_memory``, where y_t reads
M_t.)  Any ``optax.GradientTransformation`` works, including chains and nested
transforms (adam, a Muon, ...); the gradient is the chunk's sum, so
``optax.sgd(lr)`` equals plain GD with theta_t = lr at the chunk start state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nl_jax.memory import maps
from nl_jax.memory.api import check_dims, check_inputs
from nl_jax.memory.layout import from_chunks, to_chunks
from nl_jax.memory.scan import grouped_scan, pad_leading
from nl_jax.memory.spec import MemorySpec, OptaxMemoryState


def initial_optax_state(spec: MemorySpec, init_params: dict,
                        inner_opt: optax.GradientTransformation,
                        batch_size: int) -> OptaxMemoryState:
    """``init_params`` for every batch row and the inner optimizer's fresh state."""
    del spec
    params = jax.tree.map(
        lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.float32)[None],
                                   (batch_size,) + p.shape), init_params)
    opt_state = jax.vmap(jax.vmap(inner_opt.init))(params)
    return OptaxMemoryState(params=params, opt_state=opt_state)


def chunk_gradient(spec: MemorySpec, params: dict, k, v, valid) -> dict:
    """Sum over the chunk's real tokens of the step direction at ``params``."""

    def loss(p):
        w = maps.to_weights(p)
        per_token = jax.vmap(lambda kt, vt: maps.token_loss(spec, w, kt, vt))(k, v)
        return jnp.sum(jnp.where(valid, per_token, 0.0))

    grads = jax.grad(loss)(params)
    if spec.dgd:
        terms = jax.vmap(lambda kt: maps.dgd_direction(spec, maps.to_weights(params), kt))(k)
        mask = valid.astype(jnp.float32)
        summed = tuple(jnp.tensordot(mask, t, axes=1) for t in terms)
        grads = jax.tree.map(jnp.add, grads, maps.to_params(summed))
    return grads


def optax_head(spec: MemorySpec, inner_opt, params, opt_state, q, k, v, valid):
    """One head: inputs ``[N, C, ...]``, ``valid`` ``[N, C]``; returns (y, (params, opt_state))."""
    n = q.shape[0]

    def step(carry, xs):
        p, o = carry
        q_c, k_c, v_c, ok = xs
        y = maps.apply_map(spec, maps.to_weights(p), q_c)
        grads = chunk_gradient(spec, p, k_c, v_c, ok)
        updates, o_new = inner_opt.update(grads, o, p)
        p_new = optax.apply_updates(p, updates)
        any_valid = jnp.any(ok)
        keep = lambda a, b: jnp.where(any_valid, a, b)  # noqa: E731
        return (jax.tree.map(keep, p_new, p), jax.tree.map(keep, o_new, o)), y

    group = spec.remat_every
    total = -(-n // group) * group
    xs = (pad_leading(q, total), pad_leading(k, total), pad_leading(v, total),
          pad_leading(valid, total, False))
    final, y = grouped_scan(step, (params, opt_state), xs, group)
    return y[:n], final


def apply_memory_optax(spec: MemorySpec, init_params: dict,
                       inner_opt: optax.GradientTransformation, q: jax.Array,
                       k: jax.Array, v: jax.Array,
                       state: OptaxMemoryState | None = None
                       ) -> tuple[jax.Array, OptaxMemoryState]:
    """Run a memory whose weights are updated by ``inner_opt`` once per chunk.

    Args:
      spec: the memory (kind, objective, dgd, chunk_size, remat_every are used;
        momentum / weight decay / gates belong to ``inner_opt`` here).
      init_params: initial weights ``[H, ...]`` (used when ``state`` is None).
      inner_opt: any optax GradientTransformation (applied per batch row, head).
      q, k: ``[B, T, H, d_k]``; v: ``[B, T, H, d_v]``.
      state: the state after the previous segment, or None.

    Returns:
      y ``[B, T, H, d_v]`` fp32 (y_t read from the chunk-start weights) and the
      final state.  Streaming equals one pass when segments are multiples of C.
    """
    b, t, _, d_k, d_v = check_inputs(q, k, v)
    check_dims(spec, d_k, d_v)
    if state is None:
        state = initial_optax_state(spec, init_params, inner_opt, b)
    c = spec.chunk_size
    n = -(-t // c)
    valid = jnp.asarray((np.arange(n * c) < t).reshape(n, c))
    head = functools.partial(optax_head, spec, inner_opt)
    per_head = jax.vmap(head, in_axes=(0, 0, 0, 0, 0, None))
    per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, 0, None))
    y, (params, opt_state) = per_batch(state.params, state.opt_state, to_chunks(q, c, 0.0),
                                       to_chunks(k, c, 0.0), to_chunks(v, c, 0.0), valid)
    return from_chunks(y, t), OptaxMemoryState(params=params, opt_state=opt_state)
