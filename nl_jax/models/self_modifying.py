"""Self-modifying Titans, the token mixer of Hope (NL section 8, Eq. 76-93).

Per head (head dim D), with plain projections and causal convolutions
(window ``conv_window``, streaming ``layers.CausalConv``):

    u_t = conv(x_t W_u)                    shared input of the adaptive memories
    k_t = l2norm(M_k(u_t))      or  l2norm(conv(x_t W_k))   (adaptive_k=False)
    v_t = l2norm(M_v(u_t))      or  l2norm(conv(x_t W_v))   (adaptive_v=False)
    q_t = l2norm(conv(x_t W_q)) or  l2norm(M_q(u_t))        (adaptive_q=True)
    eta_t   = lr * sigmoid(r_eta . M_eta(u_t) + b_eta)     (or of x_t W_eta)
    alpha_t = sigmoid(r_alpha . M_alpha(u_t) + b_alpha)    (or of x_t W_alpha)
    beta_t  = sigmoid(x_t W_beta + b_beta)                 momentum decay (plain)
    vhat_box,t = M_box(v_t)                                 self-generated values
    y_t = M_memory,t-1(q_t)            read BEFORE the token's own update (NL)
    out = [y_t over heads] W_o

v is L2-normalised too (a choice of this project): with self-generated
targets ``vhat = M(v)`` an unnormalised v makes each memory grow by about
|v| per step, a positive feedback through M_v (observed: states of 1e4 after
12 tokens); with unit q, k, v every map is between unit vectors.

The memories, their update rule (Eq. 88), the chunked and oracle paths and the
streaming state live in the token-clock engine, ``nl_jax/memory/self_modifying.py``;
this module projects, gates and holds the outer-level parameters.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory import kernel_path
from nl_jax.memory.self_modifying import (
    GATE_BOXES,
    KINDS,
    OBJECTIVES,
    PATHS,
    VECTOR_BOXES,
    SelfModifyingSpec,
    apply_self_modifying,
    initial_state,
)
from nl_jax.models.layers import CausalConv, Dense, RMSNorm, param
from nl_jax.sharding import constrain, gather_memory_state, memory_state_axes

DEFAULTS = dict(path="auto", memory="mlp", objective="l2", chunk_size=32,
                memory_chunk_size=16, hidden_mult=2, lr=1.0, conv_window=4,
                dgd=True, momentum=True, weight_decay=True, adaptive_k=True,
                adaptive_v=True, adaptive_q=False, adaptive_eta=True,
                adaptive_alpha=True, grad_clip=0.25,
                # The conventions that tell Hope's rule from the other
                # associative memories (memory/self_modifying.SelfModifyingSpec):
                read="before", step_scale="chunk", decay_form="retention",
                normalize_v=True, generated_values=True, output_gate=False)
CHOICES = dict(read=("before", "after"), step_scale=("chunk", "token"),
               decay_form=("retention", "gated"))


def spec_from_options(c: dict) -> SelfModifyingSpec:
    """The engine's spec from validated ``model.self_modifying`` options."""
    adaptive = {b: c[f"adaptive_{b}"] for b in VECTOR_BOXES + GATE_BOXES}
    if not c["weight_decay"]:
        adaptive["alpha"] = False
    return SelfModifyingSpec(
        kind=c["memory"], objective=c["objective"], dgd=c["dgd"], momentum=c["momentum"],
        decay=c["weight_decay"], lr=float(c["lr"]), grad_clip=float(c["grad_clip"]),
        adaptive=tuple(b for b in VECTOR_BOXES + GATE_BOXES if adaptive[b]),
        chunk=c["chunk_size"], memory_chunk=c["memory_chunk_size"],
        path=kernel_path.resolve(c["path"], gpu_kernel=False),
        read=c["read"], step_scale=c["step_scale"], decay_form=c["decay_form"],
        normalize_v=c["normalize_v"], generated_values=c["generated_values"])


# --------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------

def _config(cfg, preset: dict | None = None) -> dict:
    given = dict(cfg.get("self_modifying", None) or {})
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"model.self_modifying has unknown keys {unknown}; allowed: "
                          f"{sorted(DEFAULTS)}")
    c = {**DEFAULTS, **(preset or {}), **given}
    choices = dict(path=PATHS, memory=KINDS, objective=OBJECTIVES, **CHOICES)
    for key, allowed in choices.items():
        if c[key] not in allowed:
            raise ConfigError(f"model.self_modifying.{key}={c[key]!r}; choose one of "
                              f"{list(allowed)}")
    for key in ("chunk_size", "memory_chunk_size", "hidden_mult", "conv_window"):
        v = c[key]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"model.self_modifying.{key} must be a positive integer, "
                              f"got {v!r}")
    if not isinstance(c["lr"], (int, float)) or c["lr"] < 0:
        raise ConfigError(f"model.self_modifying.lr must be a number >= 0, got {c['lr']!r}")
    smallest = min(c["chunk_size"], c["memory_chunk_size"])
    if c["step_scale"] == "token":
        smallest = 1
    if c["lr"] > smallest:
        # eta_t / C <= 1 keeps the DGD factor alpha I - (eta/C) a a^T a contraction,
        # which the bound on the memory states relies on (module docstring).
        raise ConfigError(f"model.self_modifying.lr={c['lr']} must be at most "
                          + ("1 (step_scale='token')" if c["step_scale"] == "token" else
                             f"the smaller chunk size ({smallest})")
                          + ": a per-token step above 1 makes the DGD factor expanding "
                            "and the memory states can diverge")
    clip = c["grad_clip"]
    if not isinstance(clip, (int, float)) or isinstance(clip, bool) or clip < 0:
        raise ConfigError(f"model.self_modifying.grad_clip must be a number >= 0 (0: no "
                          f"clipping of the inner gradients), got {clip!r}")
    for key in DEFAULTS:
        if isinstance(DEFAULTS[key], bool) and not isinstance(c[key], bool):
            raise ConfigError(f"model.self_modifying.{key} must be True or False, "
                              f"got {c[key]!r}")
    return c


class SelfModifyingTitans(nnx.Module):
    """Hope's token mixer: ``y, state = mixer(x, state)`` (Eq. 83-93).

    ``PRESET``: options that subclasses (the baselines of
    ``models/baselines.py``) put between ``DEFAULTS`` and the user's
    ``model.self_modifying``.
    """

    streams_exactly = True   # at any cut
    PRESET: ClassVar[dict] = {}

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        c = _config(cfg, self.PRESET)
        self.spec = spec = spec_from_options(c)
        d, h = cfg.d_model, cfg.n_heads
        self.n_heads, self.head_dim = h, d // h
        dh, hidden = self.head_dim, c["hidden_mult"] * (d // h)
        dtype = jnp.dtype(cfg.dtype)
        window = c["conv_window"]

        def proj():
            return Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype)

        def conv():
            return CausalConv(d, window, rngs=rngs, axis_name="heads")

        self.convs = nnx.Dict()
        self.proj = nnx.Dict()
        streams = list(spec.plain_vectors) + (["u"] if spec.adaptive else [])
        for name in streams:
            self.proj[name] = proj()
            self.convs[name] = conv()
        self.gate_proj = nnx.Dict()
        for name in spec.plain_gates:
            self.gate_proj[name] = Dense(d, h, ("embed", "memory_heads"), rngs=rngs,
                                         use_bias=True)
        if spec.momentum:
            self.beta_proj = Dense(d, h, ("embed", "memory_heads"), rngs=rngs,
                                   use_bias=True, init=nnx.initializers.zeros)
            self.beta_proj.bias[...] = jnp.full((h,), 2.0, jnp.float32)
        self.wo = Dense(d, d, ("heads", "embed"), rngs=rngs, dtype=dtype)
        # Output norm and gate (Gated DeltaNet): o = RMSNorm(y) * silu(x W_g).
        self.out_gate = Dense(d, d, ("embed", "heads"), rngs=rngs, dtype=dtype) if c[
            "output_gate"] else None
        self.out_norm = RMSNorm(self.head_dim) if c["output_gate"] else None

        def memory_params():
            axes = memory_state_axes(3)
            if spec.kind in ("linear", "linear_ln"):
                # Identity plus noise: with an exact identity every adaptive
                # memory would follow the same trajectory (same self-generated
                # values), so k, v, eta, alpha would stay tied forever.
                noise = nnx.initializers.normal(0.5 * dh ** -0.5)(
                    rngs.params(), (h, dh, dh), jnp.float32)
                init = jnp.eye(dh) + noise
                return nnx.Dict(w=param(rngs, init, (h, dh, dh), axes))
            return nnx.Dict(
                w2=param(rngs, nnx.initializers.normal(dh ** -0.5), (h, hidden, dh), axes),
                w1=param(rngs, nnx.initializers.normal(0.1 * hidden ** -0.5),
                         (h, dh, hidden), axes))

        self.memories = nnx.Dict({b: memory_params() for b in spec.adaptive})
        self.memories["memory"] = memory_params()
        self.readout = nnx.Dict()
        for box in GATE_BOXES:
            if box in spec.adaptive:
                bias = -2.0 if box == "eta" else 4.0
                self.readout[box] = nnx.Dict(
                    r=param(rngs, nnx.initializers.normal(dh ** -0.5), (h, dh),
                            ("memory_heads", None)),
                    b=param(rngs, jnp.asarray(bias, jnp.float32), (h,), ("memory_heads",)))
        for name in spec.plain_gates:
            bias = -2.0 if name == "eta" else 4.0
            self.gate_proj[name].bias[...] = jnp.full((h,), bias, jnp.float32)

    # -- state ------------------------------------------------------------
    def _initial_memory_state(self, batch: int):
        weights = {b: {n: gather_memory_state(p[...]) for n, p in self.memories[b].items()}
                   for b in self.memories}
        return initial_state(self.spec, weights, batch)

    def __call__(self, x: jax.Array, state: Any = None):
        b, t, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        streaming = state is not None
        conv_states = state["conv"] if streaming else {}
        mem_state = state["memory"] if streaming else self._initial_memory_state(b)
        new_conv = {}
        heads = {}
        for name in self.proj:
            y, new_conv[name] = self.convs[name](self.proj[name](x), conv_states.get(name))
            heads[name] = y.astype(jnp.float32).reshape(b, t, h, dh)
        plain = {n: heads[n] for n in self.spec.plain_vectors}
        for name in self.gate_proj:
            plain[name] = self.gate_proj[name](x.astype(jnp.float32))
        u = heads.get("u", jnp.zeros((b, t, h, dh), jnp.float32))
        log_beta = (jax.nn.log_sigmoid(self.beta_proj(x.astype(jnp.float32)))
                    if self.spec.momentum else None)
        readout = {box: (p["r"][...], p["b"][...]) for box, p in self.readout.items()}

        y, mem_state = apply_self_modifying(self.spec, mem_state, u, plain, log_beta, readout,
                                            streaming)
        if self.out_gate is not None:
            gate = jax.nn.silu(self.out_gate(x).astype(jnp.float32)).reshape(b, t, h, dh)
            y = self.out_norm(y) * gate
        y = constrain(y.reshape(b, t, h * dh).astype(x.dtype), ("batch", "length", "heads"))
        return self.wo(y), dict(conv=new_conv, memory=mem_state)
