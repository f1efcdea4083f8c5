"""Titans token mixers (arXiv:2501.00663 sections 3-4; docs/equations.md section 1).

  ``NeuralMemory`` / ``NeuralMemoryMixer`` (LMM)  the neural long-term memory
      alone: q, k, v projections -> depthwise causal conv -> SiLU, q and k
      L2-normalised per head (Titans 4.4), per-head sigmoid gates theta, eta,
      alpha (Eq. 13-14), ``nl_jax.memory.apply_memory``, per-head RMSNorm, SiLU
      output gate, output projection.
  ``MemoryAsGate`` (MAG, Eq. 26-28)  sliding-window attention and the memory in
      parallel on the same input, o = norm(y_attn) * sigmoid(norm(M(x))).
  ``MemoryAsContext`` (MAC, Eq. 21-25)  per segment: h = M*_{t-1}(q), attention
      over [persistent, h, segment], memory update with the attention output y,
      o = norm(y) * sigmoid(norm(M*_t(y))).
  ``MemoryAsLayer`` (MAL)  the memory layer, then sliding-window attention.

Choices this module makes where the paper leaves room (tested in
tests/test_titans.py):
  * persistent memory tokens (``n_persistent`` learned vectors in embedding
    space) are used as extra attention keys/values only, visible to every
    query, with no RoPE; they are not fed to the memory;
  * MAC: query i of a segment sees the persistent tokens, the retrieved tokens
    h_j and the segment tokens s_j for j <= i only (h_j = M(q_j) carries token
    j, so seeing h_{j > i} would read the future); RoPE positions restart at 0
    in every segment; y_t = M_t(q_t) is read after token t's own update, so the
    output gate of Eq. 25 is causal too;
  * the MAG/MAC combination o = RMSNorm(y) * sigmoid(RMSNorm(m)) uses per-head
    RMSNorms with learned scales ("learnable vector-valued weights", Titans 4.2);
  * the gate biases start at eta = 0.9, alpha = 0.005 and a chunk-size
    dependent theta (``initial_theta``) so that the C summed steps of a chunk
    do not overshoot at initialisation.

Every mixer is built as ``Cls(cfg, rngs=rngs)`` from ``config.model`` (with the
sub-dict ``cfg.memory``) and called as ``y, state = mixer(x, state)``; the
state carries the memory, the convolution tails and (MAG/MAL) the attention
key/value window and the inputs since the last chunk (MAC: segment) boundary
(``stream_aligned``), so segment-by-segment equals one pass at any cut.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory import (
    MemorySpec,
    MemoryState,
    apply_memory,
    init_memory_params,
    initial_state,
    maps,
)
from nl_jax.memory.maps import l2_normalize
from nl_jax.models.layers import CausalConv, Dense, RMSNorm, param, rope
from nl_jax.sharding import constrain, gather_memory_state, memory_state_axes

SPEC_KEYS = tuple(f.name for f in dataclasses.fields(MemorySpec))
TITANS_KEYS = ("segment_len", "n_persistent", "window", "remat_segments")
CONV_WINDOW = 4  # Titans 4.4: 1-D depthwise convolution after q, k, v
# Gate values at initialisation (bias = logit): momentum decay 0.9, almost no
# forgetting, and an inner learning rate that keeps the chunked step stable (see
# ``MemoryGates``).
ETA_INIT, ALPHA_INIT = 0.9, 0.005
THETA_STEP = 0.5  # 2 * theta * sum of momentum weights over a chunk at init


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------

def _memory_dict(cfg) -> dict:
    memory = cfg.get("memory") if hasattr(cfg, "get") else None
    if memory is None:
        raise ConfigError(f"model.memory is missing: Titans mixer {cfg.get('mixer')!r} "
                          f"needs a dict with keys {list(SPEC_KEYS + TITANS_KEYS)}")
    items = memory.to_dict() if hasattr(memory, "to_dict") else dict(memory)
    unknown = sorted(set(items) - set(SPEC_KEYS) - set(TITANS_KEYS))
    if unknown:
        raise ConfigError(f"model.memory.{unknown[0]} is not a known key; allowed keys "
                          f"are {sorted(SPEC_KEYS + TITANS_KEYS)}")
    return items


def memory_spec_from_config(cfg) -> MemorySpec:
    """The ``MemorySpec`` of ``cfg.memory``; a bad value names ``model.memory.<key>``."""
    items = _memory_dict(cfg)
    kwargs = {k: v for k, v in items.items() if k in SPEC_KEYS}
    for key, value in kwargs.items():
        try:
            MemorySpec(**{key: value})
        except ConfigError as err:
            raise ConfigError(f"model.memory.{key}={value!r} is not valid: {err}") from None
    return MemorySpec(**kwargs).resolved()


def memory_int(cfg, key: str, default: int, minimum: int) -> int:
    """An integer Titans key of ``cfg.memory`` (segment_len, n_persistent, window)."""
    value = _memory_dict(cfg).get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"model.memory.{key}={value!r} must be an integer >= {minimum}")
    return value


def memory_bool(cfg, key: str, default: bool) -> bool:
    """A boolean Titans key of ``cfg.memory`` (remat_segments)."""
    value = _memory_dict(cfg).get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"model.memory.{key}={value!r} must be True or False")
    return value


def attention_window(cfg) -> int:
    """Sliding window of MAG/MAL: ``memory.window``, else ``attention_window``."""
    window = memory_int(cfg, "window", 0, 0) or int(cfg.get("attention_window", 0))
    if window < 1:
        raise ConfigError("model.memory.window must be an integer >= 1 for the sliding-"
                          f"window attention of {cfg.get('mixer')!r} (or set "
                          "model.attention_window >= 1)")
    return window


def _heads(cfg) -> tuple[int, int]:
    d, h = cfg.d_model, cfg.n_heads
    if d % h:
        raise ConfigError(f"model.n_heads={h} must divide model.d_model={d}")
    return h, d // h


# ----------------------------------------------------------------------------
# Attention with an explicit mask (sliding window, persistent tokens, MAC)
# ----------------------------------------------------------------------------

def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention ``[B, Tq, H, D] x [B, Tk, H, D]``, ``mask [Tq, Tk]``, fp32 logits."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def sliding_window_attention(q: jax.Array, keys: jax.Array, values: jax.Array,
                             q_pos: jax.Array, key_pos: jax.Array, window: int,
                             prefix: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
    """Causal sliding-window attention, blockwise: O(T window) memory, not O(T^2).

    ``q [B, T, H, D]`` at positions ``q_pos [T]``; ``keys``/``values``
    ``[B, P + T, H, D]`` at ``key_pos``, where the last T are the queries' own
    tokens and the P = window - 1 before them the streamed past.  Query i
    sees the keys at positions (q_pos[i] - window, q_pos[i]] that are >= 0,
    and every ``prefix`` (persistent) key.  Queries go in blocks of
    S = min(window, T); block n needs only keys n S .. n S + S + P - 1, so the
    logits are ``[B, H, T, S + P (+ prefix)]`` instead of ``[B, H, T, P + T]``,
    with the same result as ``masked_attention`` over all keys (the extra keys
    are masked, i.e. contribute exactly 0).
    """
    b, t, h, d = q.shape
    past = keys.shape[1] - t
    size = min(window, t)
    n = -(-t // size)
    pad = n * size - t
    if pad:   # padded queries (sliced off) and keys (later positions: masked)
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        keys = jnp.pad(keys, ((0, 0), (0, pad), (0, 0), (0, 0)))
        values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
        last = q_pos[-1] + 1 + jnp.arange(pad, dtype=q_pos.dtype)
        q_pos = jnp.concatenate([q_pos, last])
        key_pos = jnp.concatenate([key_pos, last])
    index = (size * np.arange(n))[:, None] + np.arange(size + past)[None]   # [n, S + P]
    k_blocks, v_blocks = keys[:, index], values[:, index]                  # [B, n, L, H, D]
    kpos, qpos = key_pos[index][:, None, :], q_pos.reshape(n, size)[:, :, None]
    mask = (kpos <= qpos) & (kpos > qpos - window) & (kpos >= 0)           # [n, S, L]
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(x[:, None], (b, n) + x.shape[1:]) for x in prefix)
        k_blocks = jnp.concatenate([pk, k_blocks], axis=2)
        v_blocks = jnp.concatenate([pv, v_blocks], axis=2)
        mask = jnp.concatenate([jnp.ones((n, size, pk.shape[2]), bool), mask], axis=2)
    per_block = jax.vmap(masked_attention, in_axes=(1, 1, 1, 0), out_axes=1)
    out = per_block(q.reshape(b, n, size, h, d), k_blocks, v_blocks, mask)
    return out.reshape(b, n * size, h, d)[:, :t]


class AttentionState(NamedTuple):
    """Streaming state of ``SlidingWindowAttention``.

    Attributes:
      keys, values: the last ``window - 1`` keys (RoPE applied) and values,
        ``[B, window - 1, H, Dh]``; slots before position 0 are masked out.
      position: absolute position of the next token (int32 scalar).
    """

    keys: jax.Array
    values: jax.Array
    position: jax.Array


class SlidingWindowAttention(nnx.Module):
    """Causal sliding-window attention with persistent tokens (Titans 4.2-4.3).

    Returns per-head outputs ``[B, T, H, Dh]``; the caller owns the output
    projection.  The key/value window streams, so segment-by-segment == one pass.
    """

    def __init__(self, cfg, window: int, n_persistent: int, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads, self.head_dim = _heads(cfg)
        dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wk = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wv = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.persistent = (param(rngs, nnx.initializers.normal(cfg.init_std),
                                 (n_persistent, d), ("persistent", "embed"))
                           if n_persistent else None)
        self.window = window
        self.rope_theta = float(cfg.rope_theta)
        self.dtype = dtype

    def initial_state(self, batch_size: int) -> AttentionState:
        shape = (batch_size, self.window - 1, self.n_heads, self.head_dim)
        return AttentionState(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype),
                              jnp.zeros((), jnp.int32))

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(y.shape[:2] + (self.n_heads, self.head_dim))

    def __call__(self, x: jax.Array, state: AttentionState | None = None):
        b, t, _ = x.shape
        state = state if state is not None else self.initial_state(b)
        pos = state.position + jnp.arange(t, dtype=jnp.int32)
        q = rope(self._split(self.wq(x)), pos[None], self.rope_theta)
        k = rope(self._split(self.wk(x)), pos[None], self.rope_theta)
        v = self._split(self.wv(x))
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        keys = jnp.concatenate([state.keys.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([state.values.astype(v.dtype), v], axis=1)
        past = self.window - 1
        key_pos = jnp.concatenate(
            [state.position - past + jnp.arange(past, dtype=jnp.int32), pos])
        new_state = AttentionState(keys[:, keys.shape[1] - past:],
                                   values[:, values.shape[1] - past:], state.position + t)
        prefix = None
        if self.persistent is not None:
            p = self.persistent[...].astype(self.dtype)[None]
            n_p = p.shape[1]
            prefix = (jnp.broadcast_to(self._split(self.wk(p)), (b, n_p) + k.shape[2:]),
                      jnp.broadcast_to(self._split(self.wv(p)), (b, n_p) + v.shape[2:]))
        y = sliding_window_attention(q, keys, values, pos, key_pos, self.window, prefix)
        return y, new_state


# ----------------------------------------------------------------------------
# The neural long-term memory (Titans section 3)
# ----------------------------------------------------------------------------

def initial_theta(chunk_size: int) -> float:
    """Inner learning rate at initialisation.

    All C gradients of a chunk are taken at the chunk-start state, and momentum
    sums them with weights 1 + eta + ... ; with similar keys (k normalised) the
    chunk moves M by about 2 theta (M k - v) sum_i sum_{j<=i} eta^(i-j).  The
    init keeps that factor at ``THETA_STEP`` < 1 (no overshoot): a fixed theta
    such as 0.05 diverges at C = 16 when the keys of a chunk are alike (MAC).
    """
    weight = sum((1 - ETA_INIT ** (i + 1)) / (1 - ETA_INIT) for i in range(chunk_size))
    return THETA_STEP / (2 * weight)


class MemoryGates(nnx.Module):
    """Per-head data-dependent gates theta_t, eta_t, alpha_t = sigmoid(x W + b) (Eq. 13-14)."""

    def __init__(self, d_model: int, n_heads: int, chunk_size: int, *, rngs: nnx.Rngs):
        inits = (initial_theta(chunk_size), ETA_INIT, ALPHA_INIT)
        bias = jnp.asarray([[math.log(g / (1 - g))] for g in inits])
        # [gate, d_model, heads]: a stack of three [d_model, heads] projections, the
        # layout matrix optimizers (Newton-Schulz, M3, delta momentum) expect.
        self.kernel = param(rngs, nnx.initializers.normal(0.02), (3, d_model, n_heads),
                            (None, "embed", "memory_heads"))
        self.bias = param(rngs, bias, (3, n_heads), (None, "memory_heads"))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits = jnp.einsum("btd,gdh->btgh", x.astype(jnp.float32), self.kernel[...])
        gates = jax.nn.sigmoid(logits + self.bias[...])
        return gates[:, :, 0], gates[:, :, 1], gates[:, :, 2]


class CoreState(NamedTuple):
    """Streaming state of ``MemoryCore``: convolution tails and the memory."""

    conv_q: jax.Array
    conv_k: jax.Array
    conv_v: jax.Array
    memory: MemoryState


class MemoryCore(nnx.Module):
    """Projections, gates, initial memory weights and the memory rule (Titans 3, 4.4).

    ``memorize(x, state)`` returns the raw per-head reads y_t = M_t(q_t)
    ``[B, T, H, Dh]`` (fp32) after writing (k_t, v_t) into the memory;
    ``retrieve(q, memory)`` reads without writing.
    """

    def __init__(self, cfg, spec: MemorySpec, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.n_heads, self.head_dim = _heads(cfg)
        self.spec = spec
        self.dtype = jnp.dtype(cfg.dtype)
        self.wq = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
        self.wk = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
        self.wv = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
        self.conv_q = CausalConv(d, CONV_WINDOW, rngs=rngs, axis_name="heads")
        self.conv_k = CausalConv(d, CONV_WINDOW, rngs=rngs, axis_name="heads")
        self.conv_v = CausalConv(d, CONV_WINDOW, rngs=rngs, axis_name="heads")
        self.gates = MemoryGates(d, self.n_heads, spec.chunk_size, rngs=rngs)
        init = init_memory_params(spec, rngs.params(), self.n_heads, self.head_dim,
                                  self.head_dim)
        # The memory's initial state M_0 is an ordinary (outer-level) parameter.
        self.init_params = nnx.data({
            name: param(rngs, w, w.shape, memory_state_axes(w.ndim))
            for name, w in init.items()})

    def memory_init(self) -> dict:
        return {name: gather_memory_state(p[...]) for name, p in self.init_params.items()}

    def initial_state(self, batch_size: int) -> CoreState:
        tail = jnp.zeros((batch_size, CONV_WINDOW - 1, self.n_heads * self.head_dim),
                         self.dtype)
        return CoreState(tail, tail, tail,
                         initial_state(self.spec, self.memory_init(), batch_size))

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(y.shape[:2] + (self.n_heads, self.head_dim))

    def memorize(self, x: jax.Array, state: CoreState | None = None):
        """Writes the tokens of ``x [B, T, D]`` and reads y_t = M_t(q_t) (Eq. 13-14)."""
        state = state if state is not None else self.initial_state(x.shape[0])
        q, conv_q = self.conv_q(self.wq(x), state.conv_q)
        k, conv_k = self.conv_k(self.wk(x), state.conv_k)
        v, conv_v = self.conv_v(self.wv(x), state.conv_v)
        q = l2_normalize(self._split(jax.nn.silu(q)))
        k = l2_normalize(self._split(jax.nn.silu(k)))
        v = self._split(jax.nn.silu(v))
        theta, eta, alpha = self.gates(x)
        y, memory = apply_memory(self.spec, self.memory_init(), q, k, v, theta, eta, alpha,
                                 state.memory)
        y = constrain(y, ("batch", "length", "heads", "head_dim"))
        return y, CoreState(conv_q, conv_k, conv_v, memory)

    def retrieve(self, q: jax.Array, memory: MemoryState) -> jax.Array:
        """h_t = M(q_t) for ``q [B, T, H, d_k]`` without updating M (Titans Eq. 15/21)."""
        def read(params, queries):  # one (batch, head): params [...], queries [T, d_k]
            return maps.apply_map(self.spec, maps.to_weights(params), queries)

        per_head = jax.vmap(read, in_axes=(0, 1), out_axes=1)
        return jax.vmap(per_head)(memory.params, q.astype(jnp.float32))


def _gated(attn_norm: RMSNorm, memory_norm: RMSNorm, y: jax.Array, m: jax.Array) -> jax.Array:
    """o = RMSNorm(y) * sigmoid(RMSNorm(m)) per head (Titans Eq. 25 and 28)."""
    y = attn_norm(y.astype(jnp.float32))
    return y * jax.nn.sigmoid(memory_norm(m.astype(jnp.float32)))


class StreamState(NamedTuple):
    """Streaming state of a Titans mixer: its state at the last multiple of its
    alignment (memory chunk, or MAC segment) and the inputs since, ``[B, r, d]``
    with r below the alignment (a static shape)."""

    aligned: Any
    pending: jax.Array


def stream_aligned(forward, x: jax.Array, state: StreamState | None, multiple: int):
    """``forward(x, state) -> (y, state)``, a mixer whose chunks (or segments) start
    at the beginning of each call, made exact at any streaming cut.

    The inputs since the last multiple of ``multiple`` are kept in the state and
    re-run, from the state at that multiple, in front of the next segment: every
    chunk then sees the same tokens and starts from the same state as in one pass.
    A call whose length is a multiple (every training step: ``data.seq_len`` is
    validated to be one) runs ``forward`` once, as a plain call would.
    """
    aligned, pending = state if state is not None else (None, x[:, :0])
    r = pending.shape[1]
    if r + x.shape[1] == 0:     # nothing to run
        return jnp.zeros_like(x), StreamState(aligned, pending)
    xs = jnp.concatenate([pending.astype(x.dtype), x], axis=1) if r else x
    t = xs.shape[1]
    cut = t - t % multiple
    outputs = []
    if cut:
        y, aligned = forward(xs[:, :cut], aligned)
        outputs.append(y)
    if cut < t:
        outputs.append(forward(xs[:, cut:], aligned)[0])
    y = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)
    return y[:, r:], StreamState(aligned, xs[:, cut:])


class NeuralMemory(nnx.Module):
    """The long-term memory module (LMM) as a layer: ``y, state = lmm(x, state)``.

    out = W_o [RMSNorm(M_t(q_t)) * silu(x W_g)] (Titans 4.4: normalise and gate
    before the output projection).
    """

    streams_exactly = True   # at any cut (stream_aligned)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = cfg.d_model
        self.core = MemoryCore(cfg, memory_spec_from_config(cfg), rngs=rngs)
        self.out_norm = RMSNorm(self.core.head_dim, eps=cfg.norm_eps)
        self.out_gate = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=self.core.dtype)
        self.wo = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=self.core.dtype)

    def __call__(self, x: jax.Array, state: StreamState | None = None):
        return stream_aligned(self.forward, x, state, self.core.spec.chunk_size)

    def forward(self, x: jax.Array, state: CoreState | None = None):
        """The layer on ``x`` from ``state`` (None: a fresh memory); its chunks
        start at x[0]."""
        b, t, d = x.shape
        y, state = self.core.memorize(x, state)
        y = self.out_norm(y).reshape(b, t, d) * jax.nn.silu(self.out_gate(x)).astype(jnp.float32)
        y = constrain(y.astype(self.core.dtype), ("batch", "length", "heads"))
        return self.wo(y), state


class NeuralMemoryMixer(NeuralMemory):
    """Titans LMM: the neural memory alone as the token mixer (``titans_lmm``)."""


# ----------------------------------------------------------------------------
# Titans variants (section 4)
# ----------------------------------------------------------------------------

class GateState(NamedTuple):
    attention: AttentionState
    memory: CoreState


class MemoryAsGate(nnx.Module):
    """Titans MAG (Eq. 26-28): o = W_o [norm(SWA(x)) * sigmoid(norm(M(x)))]."""

    streams_exactly = True   # at any cut (stream_aligned)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        spec = memory_spec_from_config(cfg)
        _, head_dim = _heads(cfg)
        self.attention = SlidingWindowAttention(
            cfg, attention_window(cfg), memory_int(cfg, "n_persistent", 0, 0), rngs=rngs)
        self.memory = MemoryCore(cfg, spec, rngs=rngs)
        self.attn_norm = RMSNorm(head_dim, eps=cfg.norm_eps)
        self.memory_norm = RMSNorm(head_dim, eps=cfg.norm_eps)
        self.dtype = jnp.dtype(cfg.dtype)
        self.wo = Dense(cfg.d_model, cfg.d_model, ("heads", "embed"), rngs=rngs,
                        dtype=self.dtype)

    def __call__(self, x: jax.Array, state: StreamState | None = None):
        return stream_aligned(self.forward, x, state, self.memory.spec.chunk_size)

    def forward(self, x: jax.Array, state: GateState | None = None):
        b, t, d = x.shape
        attn_state, memory_state = state if state is not None else (None, None)
        y, attn_state = self.attention(x, attn_state)
        m, memory_state = self.memory.memorize(x, memory_state)
        o = _gated(self.attn_norm, self.memory_norm, y, m).reshape(b, t, d)
        o = constrain(o.astype(self.dtype), ("batch", "length", "heads"))
        return self.wo(o), GateState(attn_state, memory_state)


class LayerState(NamedTuple):
    memory: CoreState
    attention: AttentionState


class MemoryAsLayer(nnx.Module):
    """Titans MAL: the memory layer, then sliding-window attention, sequentially.

    The mixer sees n = norm(x) (the block's pre-norm) and returns
    m + SWA(norm(n + m)) with m = LMM(n), so the block computes
    x + LMM(n) + SWA(norm(n + LMM(n))): the attention reads the memory layer's
    output added to its own (normalised) input, not to the raw residual
    stream, which the mixer interface does not pass in.
    """

    streams_exactly = True   # at any cut (stream_aligned)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.memory = NeuralMemory(cfg, rngs=rngs)
        self.attention = SlidingWindowAttention(
            cfg, attention_window(cfg), memory_int(cfg, "n_persistent", 0, 0), rngs=rngs)
        self.attn_in_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.dtype = jnp.dtype(cfg.dtype)
        self.wo = Dense(cfg.d_model, cfg.d_model, ("heads", "embed"), rngs=rngs,
                        dtype=self.dtype)

    def __call__(self, x: jax.Array, state: StreamState | None = None):
        return stream_aligned(self.forward, x, state, self.memory.core.spec.chunk_size)

    def forward(self, x: jax.Array, state: LayerState | None = None):
        b, t, d = x.shape
        memory_state, attn_state = state if state is not None else (None, None)
        m, memory_state = self.memory.forward(x, memory_state)
        h = x + m.astype(x.dtype)
        y, attn_state = self.attention(self.attn_in_norm(h), attn_state)
        y = constrain(y.reshape(b, t, d), ("batch", "length", "heads"))
        return m + self.wo(y), LayerState(memory_state, attn_state)


class ContextState(NamedTuple):
    retrieval_conv: jax.Array
    memory: CoreState


class MemoryAsContext(nnx.Module):
    """Titans MAC (Eq. 21-25), segment by segment with ``lax.scan`` over segments.

    For a segment S (length ``memory.segment_len``) and memory M_{t-1}:
      q = S W_Q (conv, SiLU, L2 norm);  h = M*_{t-1}(q)                 (Eq. 21)
      y = Attn([persistent, h, S]) at the segment positions             (Eq. 22-23)
      M_t = M_{t-1} written with (k, v) of y;  m_i = M_{t,i}(q_i(y))     (Eq. 24)
      o = W_o [norm(y) * sigmoid(norm(m))]                              (Eq. 25)
    A trailing partial segment is processed the same way, on its own.
    """

    streams_exactly = True   # at any cut (stream_aligned)

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d = cfg.d_model
        spec = memory_spec_from_config(cfg)
        self.n_heads, self.head_dim = _heads(cfg)
        self.segment_len = memory_int(cfg, "segment_len", 64, 1)
        # rematerialise each segment in the backward pass: keep only the memory
        # state between segments instead of every segment's attention and memory
        # activations (backward memory O(T / segment_len) states + one segment)
        self.remat_segments = memory_bool(cfg, "remat_segments", False)
        n_persistent = memory_int(cfg, "n_persistent", 0, 0)
        self.dtype = dtype = jnp.dtype(cfg.dtype)
        self.rope_theta = float(cfg.rope_theta)
        self.retrieval_q = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.retrieval_conv = CausalConv(d, CONV_WINDOW, rngs=rngs, axis_name="heads")
        self.wq = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wk = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.wv = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.persistent = (param(rngs, nnx.initializers.normal(cfg.init_std),
                                 (n_persistent, d), ("persistent", "embed"))
                           if n_persistent else None)
        self.memory = MemoryCore(cfg, spec, rngs=rngs)
        self.attn_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.memory_norm = RMSNorm(self.head_dim, eps=cfg.norm_eps)
        self.wo = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)

    def _split(self, y: jax.Array) -> jax.Array:
        return y.reshape(y.shape[:2] + (self.n_heads, self.head_dim))

    def _merge(self, y: jax.Array) -> jax.Array:
        return y.reshape(y.shape[:2] + (self.n_heads * self.head_dim,))

    def _segment(self, memory_state: CoreState, segment):
        """One segment: retrieve, attend, memorize, gate (Eq. 21-25)."""
        q_read, q, k, v = segment  # [B, L, H, Dh]; q, k with RoPE at segment positions
        b, length = q.shape[:2]
        pos = jnp.arange(length)[None]
        # No norm on h: the first segment reads an empty (all-zero) linear
        # memory, where RMSNorm's gradient is 1/sqrt(eps).
        h = self._merge(self.memory.retrieve(q_read, memory_state.memory)).astype(self.dtype)
        hk = rope(self._split(self.wk(h)), pos, self.rope_theta)
        hv = self._split(self.wv(h))
        causal = jnp.tril(jnp.ones((length, length), bool))
        keys, values, mask = [hk, k], [hv, v], [causal, causal]
        if self.persistent is not None:
            p = self.persistent[...].astype(self.dtype)[None]
            n_p = p.shape[1]
            keys.insert(0, jnp.broadcast_to(self._split(self.wk(p)), (b, n_p) + k.shape[2:]))
            values.insert(0, jnp.broadcast_to(self._split(self.wv(p)), (b, n_p) + v.shape[2:]))
            mask.insert(0, jnp.ones((length, n_p), bool))
        y = masked_attention(q, jnp.concatenate(keys, 1), jnp.concatenate(values, 1),
                             jnp.concatenate(mask, 1))
        m, memory_state = self.memory.memorize(self._merge(y), memory_state)
        return memory_state, _gated(self.attn_norm, self.memory_norm, y, m)

    def __call__(self, x: jax.Array, state: StreamState | None = None):
        return stream_aligned(self.forward, x, state, self.segment_len)

    def forward(self, x: jax.Array, state: ContextState | None = None):
        b, t, d = x.shape
        seg = self.segment_len
        conv_state, memory_state = state if state is not None else (None, None)
        memory_state = (memory_state if memory_state is not None
                        else self.memory.initial_state(b))
        q_read, conv_state = self.retrieval_conv(self.retrieval_q(x), conv_state)
        q_read = l2_normalize(self._split(jax.nn.silu(q_read)))
        pos = (jnp.arange(t) % seg)[None]
        q = rope(self._split(self.wq(x)), pos, self.rope_theta)
        k = rope(self._split(self.wk(x)), pos, self.rope_theta)
        v = self._split(self.wv(x))
        inputs = (q_read, q, k, v)
        n_full = t // seg
        outputs = []
        if n_full:
            segments = jax.tree.map(
                lambda a: jnp.moveaxis(a[:, :n_full * seg].reshape(
                    (b, n_full, seg) + a.shape[2:]), 1, 0), inputs)
            segment = jax.checkpoint(self._segment) if self.remat_segments else self._segment
            memory_state, o = jax.lax.scan(segment, memory_state, segments)
            outputs.append(jnp.moveaxis(o, 0, 1).reshape((b, n_full * seg) + o.shape[3:]))
        if t > n_full * seg:
            tail = jax.tree.map(lambda a: a[:, n_full * seg:], inputs)
            memory_state, o = self._segment(memory_state, tail)
            outputs.append(o)
        o = jnp.concatenate(outputs, axis=1).reshape(b, t, d)
        o = constrain(o.astype(self.dtype), ("batch", "length", "heads"))
        return self.wo(o), ContextState(conv_state, memory_state)

