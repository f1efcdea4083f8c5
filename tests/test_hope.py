"""Hope / Hope-Attention language models: conversion, streaming, ablations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax.models.convert import convert_to_cms
from nl_jax.models.lm import LanguageModel

V, T = 64, 16


def model_cfg(**over):
    cfg = dict(mixer="attention", mlp="swiglu", vocab_size=V, d_model=32, n_layers=2,
               n_heads=4, d_ff=48, tie_embeddings=False, rope_theta=10000.0,
               attention_window=0, norm_eps=1e-6, init_std=0.02, dtype="float32")
    cfg.update(over)
    return ml_collections.ConfigDict(cfg)


def tokens(b=2, t=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def forward(model, toks, state=None):
    graphdef, params = nnx.split(model)
    return jax.jit(lambda p, x, s: nnx.merge(graphdef, p)(x, s))(params, toks, state)


@pytest.fixture(scope="module")
def transformer():
    return LanguageModel(model_cfg(), rngs=nnx.Rngs(3))


@pytest.mark.parametrize("periods,exact", [(("never",), False), ((4,), False),
                                           ((4, "never"), True)])
def test_conversion_with_zero_lr_reproduces_source_logits_bitwise(transformer, periods,
                                                                   exact):
    source = nnx.state(transformer, nnx.Param)
    cfg = model_cfg(mlp="cms", cms=dict(periods=periods, lr=0.0))
    hope = convert_to_cms(source, cfg, exact=exact)
    toks = tokens()
    ref, _ = forward(transformer, toks)
    out, _ = forward(hope, toks)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    level = hope.blocks[0].mlp.levels[0]
    np.testing.assert_array_equal(np.asarray(level.up.kernel[...]),
                                  np.asarray(transformer.blocks[0].mlp.up.kernel[...]))


def test_conversion_of_every_level_without_exact_changes_the_function(transformer):
    """The paper's recipe (every level a copy) applies the MLP twice for 2 levels."""
    source = nnx.state(transformer, nnx.Param)
    hope = convert_to_cms(source, model_cfg(mlp="cms", cms=dict(periods=("never", "never"))))
    ref, _ = forward(transformer, tokens())
    out, _ = forward(hope, tokens())
    assert float(jnp.abs(out - ref).max()) > 1e-4
    np.testing.assert_array_equal(np.asarray(hope.blocks[1].mlp.levels[1].down.kernel[...]),
                                  np.asarray(transformer.blocks[1].mlp.down.kernel[...]))


def hope_cfg(sm=None, cms=None):
    sm_cfg = dict(memory="linear", chunk_size=4, memory_chunk_size=2, lr=0.9)
    sm_cfg.update(sm or {})
    cms_cfg = dict(periods=(4, "never"), lr=1e-2)
    cms_cfg.update(cms or {})
    return model_cfg(mixer="self_modifying", mlp="cms", d_model=16, n_layers=1, d_ff=24,
                     n_heads=2, self_modifying=sm_cfg, cms=cms_cfg)


def test_hope_streaming_two_segments_equals_one_pass():
    model = LanguageModel(hope_cfg(sm=dict(memory="mlp", chunk_size=4,
                                           memory_chunk_size=3)), rngs=nnx.Rngs(0))
    toks = tokens(t=11)
    full, state = forward(model, toks)
    a, s1 = forward(model, toks[:, :5])
    b, s2 = forward(model, toks[:, 5:], s1)
    np.testing.assert_allclose(np.concatenate([a, b], 1), full, atol=1e-5, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s2), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)


ABLATIONS = [
    ("paper", {}, {}),                       # adaptive_q=False is the paper's Hope
    ("no_dgd", dict(dgd=False), {}),
    ("no_momentum", dict(momentum=False), {}),
    ("no_weight_decay", dict(weight_decay=False), {}),
    ("no_cms", {}, dict(use_cms=False)),
    ("no_adaptive_k", dict(adaptive_k=False), {}),
    ("no_adaptive_v", dict(adaptive_v=False), {}),
]


@pytest.mark.parametrize("name,sm,cms", ABLATIONS, ids=[a[0] for a in ABLATIONS])
def test_ablation_trains_three_steps(name, sm, cms):
    model = LanguageModel(hope_cfg(sm, cms), rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    toks = tokens(t=9)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits, _ = nnx.merge(graphdef, p)(toks[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, toks[:, 1:]).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    start = params
    losses = []
    for _ in range(3):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0] + 1e-3, losses
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, params)
    assert all(jax.tree.leaves(changed))
