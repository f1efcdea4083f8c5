"""Shared Flax NNX layers with logical axis names on every parameter.

Conventions used by every model in nl_jax:
  * activations are ``[batch, length, embed]``; heads are split as
    ``[batch, length, heads, head_dim]``;
  * every ``nnx.Param`` is created through ``param`` so it carries logical
    axis names (``sharding_names``) that ``nl_jax.sharding`` maps to the mesh;
  * parameters are fp32; ``dtype`` is the compute dtype (fp32 or bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.sharding import constrain

Initializer = Callable[..., jax.Array]

# Parameters are created without eager sharding: shardings come from the
# logical axis names, resolved by the trainer against its mesh.
import flax  # noqa: E402

flax.config.update("flax_always_shard_variable", False)


def param(rngs: nnx.Rngs | None, init: Initializer | jax.Array,
          shape: Sequence[int], axes: Sequence[str | None]) -> nnx.Param:
    """An fp32 parameter with logical axis names ``axes`` (one per dim)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    if isinstance(init, jax.Array) or not callable(init):
        value = jnp.broadcast_to(jnp.asarray(init, jnp.float32), tuple(shape))
    else:
        value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=tuple(axes))


class Dense(nnx.Module):
    """y = x W (+ b) over the last axis, W with logical axes ``axes``.

    Computed in ``dtype``; ``out_dtype`` (default ``dtype``) is the product's
    accumulation and output dtype, e.g. fp32 logits from a bf16 matmul.
    """

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None],
                 *, rngs: nnx.Rngs, use_bias: bool = False,
                 init: Initializer | None = None, dtype=jnp.float32, out_dtype=None):
        init = init or nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kernel = param(rngs, init, (d_in, d_out), axes)
        self.bias = param(rngs, jnp.zeros(()), (d_out,), (axes[1],)) if use_bias else None
        self.dtype = dtype
        self.out_dtype = out_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                    preferred_element_type=self.out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None, eps: float = 1e-6,
                 axis_name: str = "norm"):
        self.scale = param(rngs, jnp.ones(()), (dim,), (axis_name,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding on ``[batch, length, heads, head_dim]``."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [B or 1, T, half]
    sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class CausalConv(nnx.Module):
    """Depthwise causal 1-D convolution over the length axis (Titans 4.4).

    Streaming: ``state`` holds the last ``window - 1`` inputs of the previous
    segment (zeros at the start), so segment-by-segment == one pass.
    """

    def __init__(self, dim: int, window: int = 4, *, rngs: nnx.Rngs,
                 axis_name: str = "embed"):
        init = nnx.initializers.normal(1.0 / window)
        w = init(rngs.params(), (window, dim), jnp.float32)
        w = w.at[-1].add(1.0)  # start close to identity
        self.kernel = nnx.Param(w, out_sharding=("conv_window", axis_name))
        self.window = window

    def __call__(self, x: jax.Array, state: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        b, _, d = x.shape
        if state is None:
            state = jnp.zeros((b, self.window - 1, d), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)
        w = self.kernel[...].astype(x.dtype)
        t = x.shape[1]
        y = sum(xp[:, i:i + t] * w[i] for i in range(self.window))
        return y, xp[:, t:]     # the last window - 1 inputs (none for window 1)


class SwiGLU(nnx.Module):
    """SwiGLU MLP: W_down(silu(x W_gate) * (x W_up)).

    Interface shared by every channel mixer: ``__call__(x, state) -> (y, state)``
    (a plain MLP has no in-context state and returns ``None``).
    """

    streams_exactly = True   # position-wise: no state

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.gate = Dense(d_model, d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Dense(d_model, d_ff, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Dense(d_ff, d_model, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, state=None):
        h = jax.nn.silu(self.gate(x)) * self.up(x)
        h = constrain(h, ("batch", "length", "mlp"))
        return self.down(h), None
