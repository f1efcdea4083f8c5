"""The language model shared by every architecture.

    tokens -> embed -> [norm -> token mixer -> + -> norm -> channel mixer -> +] x L
           -> norm -> logits

The architecture is chosen by two config keys:

  ``model.mixer``  token mixer: ``attention`` (Transformer++), ``titans_lmm``,
                   ``titans_mag``, ``titans_mac``, ``titans_mal`` (Titans),
                   ``self_modifying`` (Hope's self-modifying Titans),
                   ``linear_attention``, ``mamba2``, ``deltanet``,
                   ``gated_deltanet``, ``ttt_linear`` (baselines on the same
                   engine);
  ``model.mlp``    channel mixer: ``swiglu`` (a frozen MLP) or ``cms``
                   (Continuum Memory System).

Transformer++ = attention + swiglu, Titans = titans_* + swiglu,
Hope = self_modifying + cms, Hope-Attention = attention + cms.  ``model.mixer``
may also be a comma-separated pattern cycled over the layers
(``"mamba2,attention"`` with ``attention_window``: Samba's layout).

Every mixer is an ``nnx.Module`` built as ``Cls(cfg, rngs=rngs)`` from the
``config.model`` ConfigDict and called as ``y, state = mixer(x, state)``:
``state`` is the in-context memory (``None`` at the start of a sequence), so a
long document can be processed segment by segment.
"""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.models.layers import Dense, RMSNorm, SwiGLU, param
from nl_jax.sharding import constrain

MIXERS = {
    "attention": "nl_jax.models.attention:CausalSelfAttention",
    "titans_lmm": "nl_jax.models.titans:NeuralMemoryMixer",
    "titans_mag": "nl_jax.models.titans:MemoryAsGate",
    "titans_mac": "nl_jax.models.titans:MemoryAsContext",
    "titans_mal": "nl_jax.models.titans:MemoryAsLayer",
    "self_modifying": "nl_jax.models.self_modifying:SelfModifyingTitans",
    # The papers' baselines: presets of the same engine (models/baselines.py).
    "linear_attention": "nl_jax.models.baselines:LinearAttention",
    "mamba2": "nl_jax.models.baselines:Mamba2",
    "deltanet": "nl_jax.models.baselines:DeltaNet",
    "gated_deltanet": "nl_jax.models.baselines:GatedDeltaNet",
    "ttt_linear": "nl_jax.models.baselines:TTTLinear",
}
MLPS = {
    "swiglu": "nl_jax.models.lm:swiglu_from_config",
    "cms": "nl_jax.models.cms:ContinuumMemory",
}


def swiglu_from_config(cfg, *, rngs: nnx.Rngs) -> SwiGLU:
    return SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=jnp.dtype(cfg.dtype))


def layer_mixers(cfg) -> list[str]:
    """The token mixer of each layer: ``model.mixer`` names one for every layer,
    or a comma-separated pattern cycled over the layers (``"mamba2,attention"``:
    Samba's alternation; the layer count must be a multiple of its length)."""
    names = [n.strip() for n in str(cfg.mixer).split(",")]
    if not all(names):
        raise ConfigError(f"model.mixer={cfg.mixer!r}: a mixer name, or names separated "
                          f"by commas (one per layer, cycled), e.g. 'mamba2,attention'")
    for name in names:
        _resolve(MIXERS, "mixer", name)
    if cfg.n_layers % len(names):
        raise ConfigError(f"model.mixer={cfg.mixer!r} is a pattern of {len(names)} mixers; "
                          f"model.n_layers={cfg.n_layers} must be a multiple of it")
    return [names[i % len(names)] for i in range(cfg.n_layers)]


def _resolve(table: dict[str, str], key: str, name: str):
    if name not in table:
        raise ConfigError(f"model.{key}={name!r} is not known; choose one of "
                          f"{sorted(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


class Block(nnx.Module):
    """Pre-norm residual block: token mixer then channel mixer."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, mixer: str | None = None):
        self.mixer_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = _resolve(MIXERS, "mixer", mixer or cfg.mixer)(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = _resolve(MLPS, "mlp", cfg.mlp)(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, state: Any = None):
        mixer_state, mlp_state = state if state is not None else (None, None)
        y, mixer_state = self.mixer(self.mixer_norm(x), mixer_state)
        x = constrain(x + y.astype(x.dtype), ("batch", "length", "embed"))
        y, mlp_state = self.mlp(self.mlp_norm(x), mlp_state)
        x = constrain(x + y.astype(x.dtype), ("batch", "length", "embed"))
        return x, (mixer_state, mlp_state)


class LanguageModel(nnx.Module):
    """Decoder-only LM; ``logits, state = model(tokens, state)``."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.dtype)
        self.embed = param(rngs, nnx.initializers.normal(cfg.init_std),
                           (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(cfg, rngs=rngs, mixer=name)
                                for name in layer_mixers(cfg)])
        remat = cfg.get("remat", False)
        if not isinstance(remat, bool):
            raise ConfigError(f"model.remat must be True or False, got {remat!r}")
        self.remat = remat
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.unembed = None if cfg.tie_embeddings else Dense(
            cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
            dtype=self.dtype, out_dtype=jnp.float32)

    def __call__(self, tokens: jax.Array, state: Any = None):
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        states = state if state is not None else (None,) * len(self.blocks)
        new_states = []
        for block, s in zip(self.blocks, states, strict=True):
            if self.remat:   # the backward keeps the block's input and recomputes the rest
                x, s = nnx.remat(lambda blk, x, s: blk(x, s))(block, x, s)
            else:
                x, s = block(x, s)
            new_states.append(s)
        x = self.final_norm(x)
        # Logits accumulate and stay in fp32 even under bf16 compute (a bf16 output
        # would round them to 8 mantissa bits before the softmax).
        if self.unembed is None:
            logits = jnp.dot(x, self.embed[...].astype(self.dtype).T,
                             preferred_element_type=jnp.float32)
        else:
            logits = self.unembed(x)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, tuple(new_states)


def streams_exactly(model: LanguageModel) -> bool:
    """Whether feeding a text segment by segment, passing the state on, gives the
    logits of one pass at any cut: every mixer and channel mixer carries its
    whole past in the state (Titans, Hope; not attention, which keeps no cache)."""
    return all(getattr(block.mixer, "streams_exactly", False)
               and getattr(block.mlp, "streams_exactly", False) for block in model.blocks)


def slowest_in_context_period(model: LanguageModel) -> int:
    """The longest period, in tokens, of the in-context CMS levels (0 without any)."""
    return max((p for block in model.blocks
                for p in getattr(block.mlp, "in_context_periods", ())), default=0)


def param_count(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
