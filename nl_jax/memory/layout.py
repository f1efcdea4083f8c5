"""The chunk layout of every token-clock level: tokens -> chunks -> tokens.

Two layouts share this module:

* **aligned** (``pad_tokens``, ``to_chunks``, ``to_chunk_major``,
  ``from_chunks``, ``from_chunk_major``): a segment starts on a chunk boundary
  and its last chunk is padded with a per-input ``fill`` (the Titans memories
  of ``api.py``, whose padding tokens are made inert by their gates);
* **streaming** (``to_stream_chunks``, ``from_stream_chunks``): a segment may
  start inside a chunk that earlier segments began (``offset`` tokens of it
  already seen); the segment is placed at that offset of a zero buffer and
  ``valid`` / ``complete`` masks say which tokens are real and which chunks end
  in the segment (their update fires).  Hope's self-modifying memories and the
  in-context CMS levels stream exactly at any cut with it.  ``offset = 0`` with
  ``streaming=False`` is the aligned layout with zero fill.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# --------------------------------------------------------------------------
# Aligned layout: [B, T, H, ...] with a per-input padding fill.
# --------------------------------------------------------------------------

def pad_tokens(x: jax.Array, chunk: int, fill: float) -> jax.Array:
    """``[B, T, ...]`` fp32 with T padded with ``fill`` to a multiple of ``chunk``."""
    t = x.shape[1]
    x = x.astype(jnp.float32)
    extra = -t % chunk
    if extra:
        pad = [(0, 0)] * x.ndim
        pad[1] = (0, extra)
        x = jnp.pad(x, pad, constant_values=fill)
    return x


def to_chunks(x: jax.Array, chunk: int, fill: float) -> jax.Array:
    """``[B, T, H, ...]`` -> ``[B, H, N, C, ...]`` fp32, T padded with ``fill``."""
    x = pad_tokens(x, chunk, fill)
    x = x.reshape((x.shape[0], -1, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 3, 1)


def to_chunk_major(x: jax.Array, chunk: int, fill: float) -> jax.Array:
    """``[B, T, H, ...]`` -> ``[N, B, H, C, ...]`` fp32, T padded with ``fill``."""
    return jnp.moveaxis(to_chunks(x, chunk, fill), 2, 0)


def from_chunks(y: jax.Array, t: int) -> jax.Array:
    """``[B, H, N, C, d]`` -> ``[B, T, H, d]``."""
    b, h, n, c, d = y.shape
    return jnp.moveaxis(y, 1, 3).reshape(b, n * c, h, d)[:, :t]


def from_chunk_major(y: jax.Array, t: int) -> jax.Array:
    """``[N, B, H, C, d]`` -> ``[B, T, H, d]``."""
    return from_chunks(jnp.moveaxis(y, 0, 2), t)


# --------------------------------------------------------------------------
# Streaming layout: a segment that may start inside a chunk.
# --------------------------------------------------------------------------

def to_stream_chunks(x: jax.Array, offset: jax.Array | int, chunk: int, streaming: bool):
    """Lays ``x [B, T, ...]`` out as chunks aligned to the token clock.

    ``offset`` is the number of tokens of the current (unfinished) chunk that
    earlier segments already processed; the segment starts at that position of
    a zero buffer.  Returns ``(xs [n, B, C, ...], valid [n, C] bool,
    complete [n] bool)``: ``valid`` marks this segment's tokens, ``complete``
    the chunks whose last token lies in this segment (their update fires).
    ``streaming=False`` means ``offset`` is statically 0.
    """
    b, t = x.shape[:2]
    lead = chunk - 1 if streaming else 0
    n = max(1, math.ceil((t + lead) / chunk))
    length = n * chunk
    buf = jnp.zeros((b, length) + x.shape[2:], x.dtype)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, x, offset, axis=1)
    pos = jnp.arange(length)
    valid = (pos >= offset) & (pos < offset + t)
    complete = (jnp.arange(n) + 1) * chunk <= offset + t
    xs = jnp.moveaxis(buf.reshape((b, n, chunk) + x.shape[2:]), 1, 0)
    return xs, valid.reshape(n, chunk), complete


def from_stream_chunks(ys: jax.Array, offset: jax.Array | int, t: int) -> jax.Array:
    """Inverse of ``to_stream_chunks``: ``[n, B, C, ...] -> [B, T, ...]``."""
    n, b, c = ys.shape[:3]
    buf = jnp.moveaxis(ys, 0, 1).reshape((b, n * c) + ys.shape[3:])
    return jax.lax.dynamic_slice_in_dim(buf, offset, t, axis=1)
