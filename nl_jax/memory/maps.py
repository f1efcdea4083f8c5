"""Memory maps: a linear matrix or a residual MLP, one head, no batch axes.

A map is a stack of linear layers W_l (``[out, in]``).  ``linear``: one layer,
M(x) = W_0 x with W_0 ``[d_v, d_k]``.  ``mlp`` (NL Eq. 89/91, Titans section 3):
M(x) = x + W_{L-1} act(... act(W_0 x)), hidden width d * mlp_expansion, act = SiLU.

Every layer's gradient for one token is rank one, (output gradient) x (layer
input)^T, and so is the DGD preconditioner term W_l x x^T (NL Eq. 57).  The
chunked path (``chunked.py``) uses this: it forms, per layer, the inputs X and
the "errors" E (output gradient, plus W_l x for DGD) of a chunk of keys, so
that the per-token step is E_j X_j^T.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from nl_jax.memory.objectives import objective_loss
from nl_jax.memory.spec import MemorySpec

Weights = tuple  # tuple of [out, in] arrays, one per layer


def layer_shapes(spec: MemorySpec, d_k: int, d_v: int) -> list[tuple[int, int]]:
    """``[(out, in), ...]`` of the map's linear layers."""
    if spec.kind == "linear":
        return [(d_v, d_k)]
    hidden = d_k * spec.mlp_expansion
    if spec.mlp_depth == 1:
        return [(d_v, d_k)]
    dims = [d_k] + [hidden] * (spec.mlp_depth - 1) + [d_v]
    return [(dims[i + 1], dims[i]) for i in range(spec.mlp_depth)]


def to_weights(params: dict) -> Weights:
    """Params dict ``{"w0": ..., "w1": ...}`` -> tuple in layer order."""
    return tuple(params[f"w{i}"] for i in range(len(params)))


def to_params(weights: Sequence[jax.Array]) -> dict:
    """Tuple of layer weights -> params dict ``{"w0": ..., ...}``."""
    return {f"w{i}": w for i, w in enumerate(weights)}


def init_weights(spec: MemorySpec, key: jax.Array, num_heads: int, d_k: int,
                 d_v: int) -> dict:
    """Initial memory weights ``{"w<l>": [H, out, in]}``, fp32.

    Linear memories start at zero (an empty memory); MLP layers are drawn from
    N(0, 1/fan_in) so that the residual MLP starts near a random feature map.
    """
    shapes = layer_shapes(spec, d_k, d_v)
    if spec.kind == "linear":
        return {"w0": jnp.zeros((num_heads,) + shapes[0], jnp.float32)}
    keys = jax.random.split(key, len(shapes))
    return {f"w{i}": jax.random.normal(kk, (num_heads, o, n), jnp.float32) / jnp.sqrt(n)
            for i, (kk, (o, n)) in enumerate(zip(keys, shapes, strict=True))}


def act(x: jax.Array) -> jax.Array:
    """The MLP memory's hidden activation, SiLU."""
    return jax.nn.silu(x)


def _dot_t(x: jax.Array, w: jax.Array) -> jax.Array:
    """x W^T over the last axis of x, fp32 accumulation."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def forward(spec: MemorySpec, weights: Weights, x: jax.Array):
    """M(x) for x ``[..., d_k]``; returns (pred, layer inputs, layer linear outputs)."""
    z = x
    inputs, linear_outs = [], []
    n = len(weights)
    for i, w in enumerate(weights):
        inputs.append(z)
        lin = _dot_t(z, w)
        linear_outs.append(lin)
        z = act(lin) if i < n - 1 else lin
    pred = x + z if spec.kind == "mlp" else z
    return pred, inputs, linear_outs


def apply_map(spec: MemorySpec, weights: Weights, x: jax.Array) -> jax.Array:
    """M(x) for x ``[..., d_k]`` -> ``[..., d_v]``."""
    return forward(spec, weights, x)[0]


def clip_scale(grad_sq_norm: jax.Array, grad_clip: float) -> jax.Array:
    """``min(1, G / |grad|_F)`` from ``|grad|_F^2`` (safe at 0; ``G <= 0``: no clip)."""
    if grad_clip <= 0:
        return jnp.ones_like(grad_sq_norm)
    return grad_clip / jnp.maximum(jnp.sqrt(grad_sq_norm + 1e-12), grad_clip)


def clip_errors(errors: jax.Array, input_sq_norms: jax.Array, grad_clip: float) -> jax.Array:
    """Rows of ``errors [..., C, out]`` scaled so that every E[j] X[j]^T has norm <= G.

    ``input_sq_norms [..., C]``: |X[j]|^2, so |E[j] X[j]^T|_F = |E[j]| |X[j]|.
    """
    if grad_clip <= 0:
        return errors
    sq = jnp.sum(errors * errors, -1) * input_sq_norms
    return errors * clip_scale(sq, grad_clip)[..., None]


def token_loss(spec: MemorySpec, weights: Weights, key: jax.Array,
               value: jax.Array) -> jax.Array:
    """The associative objective l(M; k, v) for one token or a block (summed)."""
    return objective_loss(spec.objective, apply_map(spec, weights, key), value)


def dgd_direction(spec: MemorySpec, weights: Weights, key: jax.Array) -> Weights:
    """The DGD term W_l x_l x_l^T of every layer (NL Eq. 57), x_l at ``weights``.

    It is grad_V 0.5 sum_l ||V_l x_l||^2 at V = W with the layer inputs x_l
    held constant in that inner gradient (but not for outer derivatives), so
    that for the linear memory W - theta (grad + W k k^T) = W (I - theta k k^T)
    - theta grad.
    """
    _, inputs, _ = forward(spec, weights, key)
    return jax.grad(lambda ws: 0.5 * sum(jnp.sum(jnp.square(_dot_t(x, w)))
                                         for x, w in zip(inputs, ws, strict=True)))(tuple(weights))


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / ||x|| over the last axis (fp32 accumulation): the unit keys, values and
    queries of the Titans and Hope memories (Titans 4.4)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, -1, keepdims=True) + eps)).astype(x.dtype)
