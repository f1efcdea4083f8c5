"""Analytic model FLOPs per token, one count for every family.

``model_flops_per_token(config)`` is the training work of one token of a
``data.seq_len``-token sequence of the model that ``config.model`` builds
(Transformer++, Titans, Hope, Hope-Attention, ...), for throughput and MFU
figures (``bench throughput``; the ``model_flops_per_token`` / ``mfu`` log
keys).  It reads the resolved config only: no model is built.

What counts (the convention, so that figures compare across families and
implementations):

* Matrix products only: ``2 m k n`` for an ``[m, k] x [k, n]`` product (a
  multiply-add is 2 FLOPs).  Elementwise work (norms, activations, RoPE, the
  depthwise causal convolutions, softmax, gate exponentials, trust ratios,
  gradient clipping), gathers (the embedding) and the loss are not counted.
* Training = 3 x forward: the backward of each product is two products of
  its size.  Recomputation (``model.remat``, checkpointed chunk scans, the
  blocked attention's backward) is not counted: these are model FLOPs, not
  the hardware's.
* Attention: per (query, visible key) pair and head dimension one
  multiply-add for Q K^T and one for P V, i.e. ``4 d_model`` per pair and
  layer.  Causal: query i sees i + 1 keys, ``T (T + 1) / 2`` pairs (what a
  kernel that skips masked blocks does, without the masked half of its
  diagonal blocks), or ``min(i + 1, w)`` with a sliding window ``w``; plus
  every persistent token (Titans).
* In-context (token-clock) levels count their chunked algorithm, per chunk
  of C tokens (per head for the memories), in two parts:
    - output work, done for every chunk: what the chunk's own outputs need;
    - carry work, the end-of-chunk state update, counted only for the chunks
      whose update a later token of the sequence reads: ``ceil(T / C) - 1``
      of them (the last chunk's update only feeds a streaming continuation).
  A memory's partial last chunk counts as a whole one (the chunked forms pad
  it); a CMS level's forward counts its tokens.
  The execution path (oracle, chunked, kernel) does not change the count.
* Per-sequence constants (the key/value projections of Titans' persistent
  tokens) count once per sequence.  The task-loss teach signal
  (``train/teach.py``) is training machinery, not counted.

The terms, per layer (d = d_model, H heads of D = d / H, V vocab, F d_ff):

* LM head ``2 d V`` per token (tied or not).
* ``attention`` (Transformer++, Hope-Attention): q, k, v, o projections
  ``8 d^2``; attention ``4 d pairs / T``.
* SwiGLU ``6 d F``; a CMS level (NL Eq. 70-71) ``6 d F`` (``block="mlp"``:
  ``4 d F``) forward, and for an in-context level of period P the update of
  each chunk (carry work): the extra vjp of the block in its weights,
  ``8 d F`` per token (``mlp``: ``6 d F``; the forward is shared with the
  outputs), its learning rate ``2 d`` and, with ``target="projection"``, the
  target ``2 d^2``.
* Titans neural memory (Titans Eq. 13-18, ``nl_jax/memory``): q, k, v
  projections ``6 d^2``, gates ``6 d H``; per head and chunk, for the map's
  layers W_l ``[out_l, in_l]`` and momentum: gate matrices G = La (Le theta)
  ``2 C^3`` and f = La m ``2 C^2``; the chunk-start errors (the map's forward
  on the keys and the error back-propagation through its layers; a linear
  memory with the dot objective and no DGD needs no forward); the dual-form
  outputs ``Z [X_l; W_l; S_l]^T`` and ``((Z X_l^T) * G) E_l``; carry: the two
  state updates ``X_l^T [g E_l, h E_l]``.  For the linear memory this is the
  ``2C^3 + 2C^2 + 10 C D^2 + 4 C^2 D`` per chunk of ``bench memory``.
  MAG adds sliding-window attention (``6 d^2`` projections, window pairs) and
  ``wo``; MAL the memory layer's gate and output projections and the
  attention; MAC per segment the memory read ``h = M(q)``, its key/value
  projections, attention over [persistent, h, segment] and the memory write.
* Hope's self-modifying Titans (NL Eq. 83-93, ``models/self_modifying.py``):
  projections of the plain streams and of u ``2 d^2`` each, plain gates and
  the momentum gate ``2 d H`` each, ``wo``; per head, stage 1 (chunks of
  ``chunk_size``): the reads of every adaptive memory (k, v, q, eta, alpha)
  at the anchor and the gate read-outs (output), and each adaptive memory's
  update (carry): self-generated values, gradient factors, the WY-form DGD
  update of every layer (NL Eq. 88); stage 2 (chunks of
  ``memory_chunk_size``): the main memory's values, gradient factors and
  per-token reads ``M_{t-1}(q_t)`` in WY form (output) and its update
  (carry).  A unit lower-triangular solve with n right-hand columns counts
  ``C^2 n`` (substitution), whatever the implementation.
"""

from __future__ import annotations

import math

import ml_collections

from nl_jax.errors import ConfigError

TRAIN_MULTIPLIER = 3.0   # forward + backward (two products per forward product)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------

def matmul(m: float, k: float, n: float) -> float:
    """FLOPs of an ``[m, k] x [k, n]`` product."""
    return 2.0 * m * k * n


def visible_keys(t: int, window: int = 0) -> float:
    """(query, key) pairs of causal attention over ``t`` tokens: query i sees
    ``min(i + 1, window)`` keys (all i + 1 with ``window`` 0)."""
    if window <= 0 or window >= t:
        return t * (t + 1) / 2
    return window * (window + 1) / 2 + (t - window) * window


def attention_products(d_model: int, pairs: float) -> float:
    """Q K^T and P V over ``pairs`` (query, key) pairs, all heads."""
    return 2 * matmul(pairs, d_model, 1)


def chunked(t: int, chunk: int, output: float, carry: float) -> float:
    """Work of a chunked level over ``t`` tokens: ``output`` for every chunk,
    ``carry`` for every chunk but the last (module docstring)."""
    n = -(-t // chunk)
    return n * output + (n - 1) * carry


def map_forward(rows: int, layers) -> float:
    """A memory map ``[(out, in), ...]`` applied to ``rows`` inputs."""
    return sum(matmul(rows, n_in, n_out) for n_out, n_in in layers)


def gradient_factors(rows: int, layers, needs_last_forward: bool) -> float:
    """Per-token gradient factors (layer inputs and output errors) of a map at one
    state: its forward (the last layer's only where the error reads the map's
    output) and the error back-propagation to every layer below the last."""
    last = len(layers) - 1
    total = 0.0
    for i, (n_out, n_in) in enumerate(layers):
        if i < last or needs_last_forward:
            total += matmul(rows, n_in, n_out)
        if i > 0:
            total += matmul(rows, n_out, n_in)
    return total


# --------------------------------------------------------------------------
# Channel mixers
# --------------------------------------------------------------------------

def swiglu_flops(m, t: int) -> float:
    """SwiGLU: gate, up and down projections."""
    return 3 * matmul(1, m.d_model, m.d_ff)


def cms_levels(m) -> list[tuple[object, str, int, str]]:
    """``(period, block, d_ff, target)`` of every CMS level of ``model.cms``
    (the defaults of ``models/cms.py``)."""
    from nl_jax.models.cms import NEVER
    c = dict(m.get("cms", None) or {})
    periods = c.get("periods", (NEVER,))
    periods = (periods,) if isinstance(periods, (str, int)) else tuple(periods)
    if not c.get("use_cms", True):
        periods = (NEVER,)
    d_ff = c.get("d_ff", m.d_ff)
    d_ffs = tuple(d_ff) if isinstance(d_ff, (tuple, list)) else (d_ff,) * len(periods)
    if len(d_ffs) != len(periods):
        raise ConfigError(f"model.cms.d_ff must be a positive int or one per level "
                          f"({len(periods)}), got {d_ff!r}")
    block, target = c.get("block", "swiglu"), c.get("target", "input")
    return [(p, block, f, target) for p, f in zip(periods, d_ffs, strict=True)]


def cms_level_flops(d: int, t: int, period, block: str, d_ff: int, target: str) -> float:
    """One CMS level over ``t`` tokens (NL Eq. 71): its forward, plus for an
    in-context level the update of every chunk a later token reads."""
    from nl_jax.models.cms import NEVER
    if block not in ("swiglu", "mlp"):
        raise ConfigError(f"model.cms.block={block!r}: no FLOP count for it; choose "
                          f"swiglu or mlp")
    matrices = 3 if block == "swiglu" else 2
    forward = matrices * matmul(1, d, d_ff)
    if period == NEVER:
        return t * forward
    weight_vjp = (matrices + 1) * matmul(1, d, d_ff)   # dW of each matrix + the hidden error
    update = weight_vjp + matmul(1, d, 1) + (matmul(1, d, d) if target == "projection" else 0)
    return t * forward + chunked(t, period, 0.0, period * update)   # no padding: t tokens


def cms_flops(m, t: int) -> float:
    """Continuum Memory System: every level (NL Eq. 70-74)."""
    return sum(cms_level_flops(m.d_model, t, *level) for level in cms_levels(m)) / t


# --------------------------------------------------------------------------
# Token mixers
# --------------------------------------------------------------------------

def attention_mixer_flops(m, t: int) -> float:
    """Transformer++ attention: q, k, v, o projections and causal attention."""
    window = int(m.get("attention_window", 0))
    return (4 * matmul(1, m.d_model, m.d_model)
            + attention_products(m.d_model, visible_keys(t, window)) / t)


def titans_memory_chunk(spec, chunk: int, head_dim: int) -> tuple[float, float]:
    """(output, carry) work of one chunk of one head of a Titans memory (module
    docstring; ``nl_jax/memory/chunked.py`` and ``linear_chunked.py``)."""
    from nl_jax.memory.maps import layer_shapes
    layers = layer_shapes(spec, head_dim, head_dim)
    copies = 2 if spec.momentum else 1        # W and S (momentum) share each product
    gates = matmul(chunk, chunk, chunk) + matmul(chunk, chunk, 1)   # G = La (Le theta), f = La m
    output = gates if spec.momentum else 0.0
    output += gradient_factors(chunk, layers, spec.objective != "dot" or spec.dgd)
    carry = 0.0
    for n_out, n_in in layers:
        output += matmul(chunk, n_in, chunk + copies * n_out)   # Z [X; W; S]^T
        output += matmul(chunk, chunk, n_out)                    # ((Z X^T) * G) E
        carry += matmul(n_in, chunk, copies * n_out)             # X^T [g E, h E]
    return output, carry


def titans_memory_flops(m, spec, t: int, chunk_tokens: int | None = None) -> float:
    """A Titans ``MemoryCore`` writing ``t`` tokens: q, k, v projections, gates
    and the memory (chunks restart every ``chunk_tokens`` tokens: MAC segments)."""
    d, h = m.d_model, m.n_heads
    output, carry = titans_memory_chunk(spec, spec.chunk_size, d // h)
    span = chunk_tokens or t
    full, rest = divmod(t, span)
    chunks = full * -(-span // spec.chunk_size) + -(-rest // spec.chunk_size)
    memory = h * (chunks * output + (chunks - 1) * carry)
    return t * (3 * matmul(1, d, d) + matmul(1, d, 3 * h)) + memory


def sliding_attention_flops(m, t: int, window: int, persistent: int) -> float:
    """Titans' sliding-window attention over ``t`` tokens: q, k, v projections,
    the persistent tokens' keys and values, attention."""
    d = m.d_model
    pairs = visible_keys(t, window) + persistent * t
    return (t * 3 * matmul(1, d, d) + 2 * matmul(persistent, d, d)
            + attention_products(d, pairs))


def titans_parts(m):
    """(memory spec, window, persistent tokens, MAC segment) of ``model.memory``."""
    from nl_jax.models import titans
    window = titans.attention_window(m) if m.mixer in ("titans_mag", "titans_mal") else 0
    return (titans.memory_spec_from_config(m), window,
            titans.memory_int(m, "n_persistent", 0, 0),
            titans.memory_int(m, "segment_len", 64, 1))


def titans_lmm_flops(m, t: int) -> float:
    """Titans LMM: the memory layer, its output gate and projection."""
    spec = titans_parts(m)[0]
    return titans_memory_flops(m, spec, t) / t + 2 * matmul(1, m.d_model, m.d_model)


def titans_mag_flops(m, t: int) -> float:
    """Titans MAG (Eq. 26-28): sliding-window attention and the memory, ``wo``."""
    spec, window, persistent, _ = titans_parts(m)
    return ((sliding_attention_flops(m, t, window, persistent)
             + titans_memory_flops(m, spec, t)) / t + matmul(1, m.d_model, m.d_model))


def titans_mal_flops(m, t: int) -> float:
    """Titans MAL: the memory layer, then sliding-window attention and ``wo``."""
    _, window, persistent, _ = titans_parts(m)
    return (titans_lmm_flops(m, t) + sliding_attention_flops(m, t, window, persistent) / t
            + matmul(1, m.d_model, m.d_model))


def titans_mac_flops(m, t: int) -> float:
    """Titans MAC (Eq. 21-25): retrieval query, q/k/v, per segment the memory read
    h = M(q), keys and values of h, attention over [persistent, h, segment], the
    memory write of the attention output; ``wo``."""
    from nl_jax.memory.maps import layer_shapes
    spec, _, persistent, segment = titans_parts(m)
    d, h = m.d_model, m.n_heads
    full, rest = divmod(t, segment)
    segments = [segment] * full + ([rest] if rest else [])
    pairs = sum(persistent * s + 2 * visible_keys(s) for s in segments)
    read = h * map_forward(t, layer_shapes(spec, d // h, d // h))
    per_segment_persistent = len(segments) * 2 * matmul(persistent, d, d)
    return ((read + per_segment_persistent + attention_products(d, pairs)
             + titans_memory_flops(m, spec, t, segment)) / t
            + 7 * matmul(1, d, d))     # retrieval q; q, k, v; keys, values of h; wo


# --------------------------------------------------------------------------
# Hope: self-modifying Titans
# --------------------------------------------------------------------------

def hope_options(m) -> dict:
    """``model.self_modifying`` over the defaults of ``models/self_modifying.py``
    and the preset of a baseline mixer (``models/baselines.py``)."""
    from nl_jax.models import lm
    from nl_jax.models.self_modifying import DEFAULTS
    preset = getattr(lm._resolve(lm.MIXERS, "mixer", m.mixer), "PRESET", {})
    return {**DEFAULTS, **preset, **dict(m.get("self_modifying", None) or {})}


def hope_boxes(o: dict) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(adaptive boxes, plain vectors, plain gates) of the options (NL Eq. 83-87)."""
    vectors, gates = ("k", "v", "q"), ("eta", "alpha")
    adaptive = tuple(b for b in vectors + gates if o[f"adaptive_{b}"]
                     and (b != "alpha" or o["weight_decay"]))
    plain_vectors = tuple(b for b in vectors if b not in adaptive)
    plain_gates = tuple(b for b in gates if b not in adaptive
                        and (b == "eta" or o["weight_decay"]))
    return adaptive, plain_vectors, plain_gates


def hope_map_layers(o: dict, head_dim: int) -> list[tuple[int, int]]:
    """``[(out, in), ...]`` in application order: ``W x`` or ``x + W1 silu(W2 x)``."""
    if o["memory"] in ("linear", "linear_ln"):
        return [(head_dim, head_dim)]
    hidden = o["hidden_mult"] * head_dim
    return [(hidden, head_dim), (head_dim, hidden)]


def hope_gate_terms(chunk: int, momentum: bool) -> tuple[float, float]:
    """(within-chunk, end-of-chunk) products of the chunk's momentum gate matrices:
    D Lb and D m for the reads and the solve, their last rows for the update."""
    if not momentum:
        return 0.0, 0.0
    return (matmul(chunk, chunk, chunk) + matmul(chunk, chunk, 1),
            matmul(1, chunk, chunk) + matmul(1, chunk, 1))


def unit_lower_inverse_flops(chunk: int) -> float:
    """The block doubling of ``memory/triangular.unit_lower_inverse`` on a chunk
    padded to the next power of two: at block size s, size / 2s pairs of two
    s x s products, ``sum_s 2 size s^2`` in all (~ 2/3 C^3)."""
    size = 1 << max(0, (chunk - 1).bit_length())
    total, s = 0.0, 1
    while s < size:
        total += (size // (2 * s)) * 2 * matmul(s, s, s)
        s *= 2
    return total


def hope_layer_chunk(chunk: int, n_out: int, n_in: int, o: dict, reads: bool,
                     memories: int = 1, shared_input: bool = False) -> tuple[float, float]:
    """(output, carry) work of one layer's WY-form chunk (NL Eq. 88) in
    ``memories`` memories updated on the same tokens and gates.

    Output: the per-token reads W_{t-1} q_t (``reads``) and, with DGD, the unit
    lower-triangular system of the DGD terms, which the reads need; carry: the
    end-of-chunk update of W (and S), and the DGD system when nothing reads.
    With ``shared_input`` every memory's layer sees the same inputs (the keys,
    the first layer of Hope's adaptive memories): their Gram matrix, and so
    the system's matrix, is built once.
    """
    dgd, momentum = o["dgd"], o["momentum"]
    read = 0.0
    if reads:
        read = (matmul(chunk, n_in, chunk) + matmul(chunk, n_in, n_out)
                + matmul(chunk, chunk, n_out)
                + (matmul(chunk, n_in, n_out) if momentum else 0.0)
                + (matmul(chunk, chunk, n_out) if dgd else 0.0))
    solve = 0.0
    if dgd:
        gram = matmul(chunk, n_in, chunk)
        solve = ((1 if shared_input else memories) * gram
                 + memories * (matmul(chunk, n_in, n_out) + matmul(chunk, chunk, n_out)
                               + (matmul(chunk, n_in, n_out) if momentum else 0.0)
                               + chunk * chunk * n_out + unit_lower_inverse_flops(chunk)))
    update = memories * (1 + dgd + momentum) * matmul(n_out, chunk, n_in)
    if reads:
        return memories * read + solve, update
    return 0.0, solve + update


def hope_stage1_chunk(o: dict, head_dim: int) -> tuple[float, float]:
    """(output, carry) of one chunk of the adaptive memories, one head."""
    adaptive, _, _ = hope_boxes(o)
    if not adaptive:
        return 0.0, 0.0
    c, layers, n = o["chunk_size"], hope_map_layers(o, head_dim), len(adaptive)
    readout_gates = sum(b in adaptive for b in ("eta", "alpha"))
    output = n * map_forward(c, layers) + readout_gates * matmul(c, head_dim, 1)
    inner, ends = hope_gate_terms(c, o["momentum"])
    carry = (inner if o["dgd"] else 0.0) + ends + n * (
        map_forward(c, layers) + gradient_factors(c, layers, o["objective"] != "dot"))
    for i, (n_out, n_in) in enumerate(layers):
        carry += hope_layer_chunk(c, n_out, n_in, o, reads=False, memories=n,
                                  shared_input=i == 0)[1]
    return output, carry


def hope_stage2_chunk(o: dict, head_dim: int) -> tuple[float, float]:
    """(output, carry) of one chunk of the main memory, one head."""
    c, layers = o["memory_chunk_size"], hope_map_layers(o, head_dim)
    inner, ends = hope_gate_terms(c, o["momentum"])
    targets = map_forward(c, layers) if o["generated_values"] else 0.0   # vhat = M(v)
    output = inner + targets + gradient_factors(c, layers, o["objective"] != "dot")
    carry = ends
    for n_out, n_in in layers:
        layer_output, layer_carry = hope_layer_chunk(c, n_out, n_in, o, reads=True)
        output += layer_output
        carry += layer_carry
    return output, carry


def self_modifying_flops(m, t: int) -> float:
    """Hope's token mixer: projections, gates, both chunk stages, ``wo``."""
    o = hope_options(m)
    d, h = m.d_model, m.n_heads
    adaptive, plain_vectors, plain_gates = hope_boxes(o)
    streams = len(plain_vectors) + (1 if adaptive else 0)
    gates = len(plain_gates) + (1 if o["momentum"] else 0)
    projections = ((streams + 1 + bool(o["output_gate"])) * matmul(1, d, d)
                   + gates * matmul(1, d, h))
    stage1 = chunked(t, o["chunk_size"], *hope_stage1_chunk(o, d // h))
    stage2 = chunked(t, o["memory_chunk_size"], *hope_stage2_chunk(o, d // h))
    return projections + h * (stage1 + stage2) / t


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------

MIXER_FLOPS = {
    "attention": attention_mixer_flops,
    "titans_lmm": titans_lmm_flops,
    "titans_mag": titans_mag_flops,
    "titans_mac": titans_mac_flops,
    "titans_mal": titans_mal_flops,
    "self_modifying": self_modifying_flops,
    # The baselines are presets of the same mixer (models/baselines.py).
    "linear_attention": self_modifying_flops,
    "mamba2": self_modifying_flops,
    "deltanet": self_modifying_flops,
    "gated_deltanet": self_modifying_flops,
    "ttt_linear": self_modifying_flops,
}
MLP_FLOPS = {"swiglu": swiglu_flops, "cms": cms_flops}


def _counter(table: dict, key: str, name: str):
    if name not in table:
        raise ConfigError(f"model.{key}={name!r}: no FLOP count is known for it "
                          f"(nl_jax/models/flops.py counts {sorted(table)})")
    return table[name]


def forward_flops_breakdown(config, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per token by part: ``mixer`` and ``mlp`` (all layers), ``lm_head``.

    ``seq_len``: the sequence length (default ``config.data.seq_len``).
    """
    m = config.model
    t = int(seq_len or config.data.seq_len)
    if t < 1:
        raise ConfigError(f"data.seq_len must be a positive integer, got {t}")
    from nl_jax.models.lm import layer_mixers
    mixer_flops = 0.0
    for name in layer_mixers(m):          # a pattern: each layer's own mixer
        layer = ml_collections.ConfigDict(m.to_dict())
        layer.mixer = name
        mixer_flops += _counter(MIXER_FLOPS, "mixer", name)(layer, t)
    mlp = _counter(MLP_FLOPS, "mlp", m.mlp)
    return {"mixer": mixer_flops, "mlp": m.n_layers * mlp(m, t),
            "lm_head": matmul(1, m.d_model, m.vocab_size)}


def forward_flops_per_token(config, seq_len: int | None = None) -> float:
    """Forward FLOPs per token (module docstring)."""
    return math.fsum(forward_flops_breakdown(config, seq_len).values())


def model_flops_per_token(config, seq_len: int | None = None) -> float:
    """Training FLOPs per token: 3 x the forward (module docstring)."""
    return TRAIN_MULTIPLIER * forward_flops_per_token(config, seq_len)
