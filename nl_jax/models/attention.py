"""Causal softmax self-attention with RoPE (Transformer++), optional window."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.models.layers import Dense, rope
from nl_jax.sharding import constrain


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int = 0,
                     bias_len: int = 0) -> jax.Array:
    """Softmax attention on ``[B, T, H, Dh]`` inputs, fp32 logits.

    ``window > 0`` limits each query to the last ``window`` keys (sliding
    window attention, Titans MAG).  ``bias_len`` leading keys (persistent
    memory tokens, Titans MAC) are visible to every query.
    """
    t_q, t_k = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    qi = jnp.arange(t_q)[:, None] + (t_k - t_q)
    ki = jnp.arange(t_k)[None, :]
    mask = ki <= qi
    if window > 0:
        mask &= ki > qi - window
    if bias_len:
        mask |= ki < bias_len
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal attention; the Transformer++ token mixer.

    ``__call__(x, state) -> (y, state)``; attention keeps no in-context state
    between segments here (``state`` is passed through as ``None``).
    """

    streams_exactly = False   # no key/value cache is kept: a segment sees only itself

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim = h, d // h
        dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wk = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wv = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wo = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)
        self.rope_theta = float(cfg.rope_theta)
        self.window = int(cfg.get("attention_window", 0))

    def __call__(self, x: jax.Array, state=None):
        b, t, _ = x.shape

        def split(y):
            return y.reshape(b, t, self.n_heads, self.head_dim)

        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        pos = jnp.arange(t)[None]
        q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        o = causal_attention(q, k, v, window=self.window)
        o = constrain(o.reshape(b, t, -1), ("batch", "length", "heads"))
        return self.wo(o), state
