"""Deep Momentum Gradient Descent, DMGD (NL Eq. 50).

The momentum is a memory M_phi(.) read at the current gradient u_i:

    W_{i+1} = W_i + M_{phi_{i+1}}(u_i),
    phi_{i+1} = a phi_i - lr grad_phi L2(phi_i; u_i).

Inner objective chosen here: the dot-product similarity of Eq. 33 lifted to a
deep memory, L2(phi; u) = <M_phi(u), u> (sum over all entries), i.e. the
memory learns to answer a gradient with a direction of steepest decrease.

Memory: each parameter's gradient is viewed as rows U [n, d] (d = last axis;
a vector is one row) and

    M_phi(U) = B + tanh(U W1) W2,     B [n, d], W1 [d, h], W2 [h, d].

Closed-form inner gradients (H = tanh(U W1)):

    dL2/dB  = U
    dL2/dW2 = H^T U
    dL2/dW1 = U^T ((U W2^T) * (1 - H^2))

Retention ``momentum`` (a) applies to the stored values B and W2; the key
projection W1 is learned without decay (a decayed W1 would collapse to zero
before W2 grows).  The MLP weights take the step lr * ``mlp_lr_scale``.
With B alone (``hidden=0``) this is exactly momentum, Eq. 33-34: B is the
momentum buffer.  W1 starts from N(0, init_scale^2 / d) with a fixed key
(``seed``) so the optimizer init is deterministic; W2 starts at zero, so the
first update equals momentum's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class DMGDState(NamedTuple):
    bias: optax.Updates   # B per parameter (the linear momentum path)
    w1: optax.Updates     # [d, h] per parameter
    w2: optax.Updates     # [h, d] per parameter


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


def memory_read(bias, w1, w2, u_rows):
    """M_phi(U) = B + tanh(U W1) W2 on row-shaped arrays."""
    return bias + jnp.tanh(u_rows @ w1) @ w2


def inner_gradients(w1, w2, u_rows):
    """(dL2/dB, dL2/dW1, dL2/dW2) of L2 = <M_phi(U), U>."""
    h = jnp.tanh(u_rows @ w1)
    d_w2 = h.T @ u_rows
    d_w1 = u_rows.T @ ((u_rows @ w2.T) * (1.0 - h * h))
    return u_rows, d_w1, d_w2


def dmgd(learning_rate, momentum: float = 0.9, mlp_lr_scale: float = 1.0,
         init_scale: float = 1.0, hidden: int = 8, seed: int = 0
         ) -> optax.GradientTransformation:
    """Deep momentum with an MLP memory trained online on the gradients (Eq. 50)."""

    def init(params):
        leaves, treedef = jax.tree.flatten(params)
        key = jax.random.PRNGKey(seed)
        biases, w1s, w2s = [], [], []
        for i, p in enumerate(leaves):
            rows = _rows(jnp.zeros(jnp.shape(p), jnp.float32))
            d = rows.shape[1]
            w1 = jax.random.normal(jax.random.fold_in(key, i), (d, hidden), jnp.float32)
            biases.append(jnp.zeros(jnp.shape(p), jnp.float32))
            w1s.append(w1 * init_scale / jnp.sqrt(d))
            w2s.append(jnp.zeros((hidden, d), jnp.float32))
        unflatten = lambda xs: jax.tree.unflatten(treedef, xs)  # noqa: E731
        return DMGDState(unflatten(biases), unflatten(w1s), unflatten(w2s))

    def leaf_update(g, bias, w1, w2):
        u = _rows(g.astype(jnp.float32))
        d_b, d_w1, d_w2 = inner_gradients(w1, w2, u)
        mlp_lr = learning_rate * mlp_lr_scale
        bias = momentum * _rows(bias) - learning_rate * d_b
        w1 = w1 - mlp_lr * d_w1
        w2 = momentum * w2 - mlp_lr * d_w2
        out = memory_read(bias, w1, w2, u)
        return out.reshape(g.shape), bias.reshape(g.shape), w1, w2

    def update(grads, state, params=None):
        del params
        g_leaves, treedef = jax.tree.flatten(grads)
        results = [leaf_update(g, b, w1, w2) for g, b, w1, w2 in zip(
            g_leaves, treedef.flatten_up_to(state.bias), treedef.flatten_up_to(state.w1),
            treedef.flatten_up_to(state.w2), strict=True)]
        unflatten = lambda i: jax.tree.unflatten(treedef, [r[i] for r in results])  # noqa: E731
        return unflatten(0), DMGDState(unflatten(1), unflatten(2), unflatten(3))

    return optax.GradientTransformation(init, update)
