"""Causal softmax self-attention with RoPE (Transformer++), optional window.

The module attends in blocks of queries (``blocked_causal_attention``): block
i reads only the keys it can see, and its scores are recomputed in the
backward pass, so memory grows like T x block, not T^2, and the masked keys
after a block are never multiplied (about half of the full T^2 products at
long lengths).  Up to one block (``QUERY_BLOCK`` tokens) it is the plain form
``causal_attention``, which materialises the T x T scores.
"""

from __future__ import annotations

import functools

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


QUERY_BLOCK = 512       # queries per block of the blocked form
MAX_QUERY_BLOCKS = 32   # longer sequences get longer blocks (the loop is unrolled)


def query_block_size(t: int) -> int:
    """Queries per block for a ``t``-token sequence: ``QUERY_BLOCK``, or more so
    that there are at most ``MAX_QUERY_BLOCKS`` blocks."""
    return max(QUERY_BLOCK, -(-t // MAX_QUERY_BLOCKS))


def _visible_key_range(start: int, end: int, window: int) -> tuple[int, int]:
    """Keys ``[lo, end)`` that queries ``start .. end - 1`` may see."""
    return (max(0, start - window + 1) if window > 0 else 0), end


def _attend_block(q_block: jax.Array, k: jax.Array, v: jax.Array, *, lo: int, end: int,
                  window: int) -> jax.Array:
    """One block of queries ending at key ``end``, against keys ``lo .. end - 1``.

    Takes the whole ``k``, ``v`` and slices inside, so that the checkpointed
    blocks all keep the same k and v for the backward, not a slice each."""
    return causal_attention(q_block, k[:, lo:end], v[:, lo:end], window=window)


def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int = 0,
                             block: int | None = None) -> jax.Array:
    """``causal_attention(q, k, v, window)`` for self-attention (``q``, ``k``, ``v``
    ``[B, T, H, Dh]`` at the same positions), one block of queries at a time.

    Block ``[s, e)`` attends to keys ``[max(0, s - window + 1), e)`` (all keys
    before ``e`` without a window) with the plain form, whose extra keys would
    only be masked: the same softmax rows, up to the summation order.  Each
    block is a ``jax.checkpoint``: the backward keeps q, k, v and recomputes a
    block's scores, so no T x T (or T x window) array is kept.  ``block``
    defaults to ``query_block_size(T)``; T up to one block is one plain call.
    """
    t = q.shape[1]
    block = block or query_block_size(t)
    if t <= block:
        return causal_attention(q, k, v, window=window)
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        lo, end = _visible_key_range(start, end, window)
        attend = jax.checkpoint(functools.partial(_attend_block, lo=lo, end=end,
                                                  window=window))
        outputs.append(attend(q[:, start:end], k, v))
    return jnp.concatenate(outputs, axis=1)


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
        o = blocked_causal_attention(q, k, v, window=self.window)
        o = constrain(o.reshape(b, t, -1), ("batch", "length", "heads"))
        return self.wo(o), state
