"""The oracle: an exact per-token lax.scan of the memory rule, one head.

For every token t of chunk c (tokens c*C .. c*C + C - 1), with M_0 the state at
the start of the chunk (Titans Eq. 13-14, 16; NL Eq. 57):

    u_t = grad_M l(M_0; k_t, v_t)  [+ W_l x_l x_l^T per layer, x_l at M_0, if DGD]
          [each layer scaled by min(1, G / |u_t,l|_F) if spec.grad_clip = G > 0]
    S_t = eta_t S_{t-1} - theta_t u_t          (eta_t := 0 without momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t          (alpha_t := 0 without weight decay)
    y_t = M_t(q_t)

Gradients come from ``jax.grad`` of the objective, token by token.  C = 1 is
the exact per-token recurrence.  Tokens with ``valid`` False leave the state
unchanged (they pad T to a multiple of C).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nl_jax.memory import maps
from nl_jax.memory.spec import MemorySpec


def token_direction(spec: MemorySpec, weights, key, value):
    """u_t: the objective gradient (+ DGD term) at ``weights`` for one token."""
    grad = jax.grad(lambda w: maps.token_loss(spec, w, key, value))(weights)
    if spec.dgd:
        grad = jax.tree.map(jnp.add, grad, maps.dgd_direction(spec, weights, key))
    if spec.grad_clip > 0:
        grad = jax.tree.map(lambda g: g * maps.clip_scale(jnp.sum(g * g), spec.grad_clip),
                            grad)
    return grad


def oracle_head(spec: MemorySpec, weights, momentum, q, k, v, theta, eta, alpha, valid):
    """One head: inputs ``[N, C, ...]``; returns (y ``[N, C, d_v]``, (weights, momentum))."""

    def token_step(chunk_start, carry, token):
        w, s = carry
        q_t, k_t, v_t, th, et, al, ok = token
        u = token_direction(spec, chunk_start, k_t, v_t)
        et = et if spec.momentum else 0.0
        al = al if spec.weight_decay else 0.0
        s_new = jax.tree.map(lambda s_, u_: et * s_ - th * u_, s, u)
        w_new = jax.tree.map(lambda w_, s_: (1.0 - al) * w_ + s_, w, s_new)
        if not spec.momentum:
            s_new = s
        w_new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), w_new, w)
        s_new = jax.tree.map(lambda a, b: jnp.where(ok, a, b), s_new, s)
        y = maps.apply_map(spec, w_new, q_t)
        return (w_new, s_new), y

    def chunk_step(carry, chunk):
        chunk_start = carry[0]
        return jax.lax.scan(lambda c, t: token_step(chunk_start, c, t), carry, chunk)

    carry, y = jax.lax.scan(chunk_step, (weights, momentum),
                            (q, k, v, theta, eta, alpha, valid))
    return y, carry
