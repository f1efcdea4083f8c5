"""The baselines (linear attention, Mamba2, DeltaNet, Gated DeltaNet) as presets of
the one engine: each equals its published per-token recurrence written plainly
(values and gradients, chunked and oracle paths), streams exactly, is causal."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nl_jax.memory.self_modifying import apply_self_modifying, initial_state
from nl_jax.models import baselines
from nl_jax.models.self_modifying import DEFAULTS, spec_from_options

PRESETS = {"linear_attention": baselines.LinearAttention, "mamba2": baselines.Mamba2,
           "deltanet": baselines.DeltaNet, "gated_deltanet": baselines.GatedDeltaNet,
           "ttt_linear": baselines.TTTLinear}
B, T, H, D, C = 2, 37, 2, 8, 8          # T not a multiple of the chunk C


def l2n(x):
    return x / jnp.sqrt(jnp.sum(x * x, -1, keepdims=True) + 1e-6)


def ttt_linear_published(w0, q, k, v, eta_logit):
    """TTT-Linear (Sun et al. 2024) on one head: mini-batches of C tokens, every
    gradient of a mini-batch at its start weights, f(x) = x + LN(W x)."""
    def ln(z):
        centred = z - jnp.mean(z)
        return centred / jnp.sqrt(jnp.mean(centred * centred) + 1e-6)

    def loss(m, k_t, v_t):
        return 0.5 * jnp.sum((k_t + ln(m @ k_t) - v_t) ** 2)

    def step(carry, inputs):
        w, w_start, t = carry
        q_t, k_t, v_t, eta_t = inputs
        w = w - eta_t * jax.grad(loss)(w_start, k_t, v_t)   # gradient at the batch start
        w_start = jnp.where((t + 1) % C == 0, w, w_start)    # the next mini-batch starts
        return (w, w_start, t + 1), q_t + ln(w @ q_t)

    (w, _, _), out = jax.lax.scan(step, (w0, w0, 0),
                                  (l2n(q), l2n(k), v, jax.nn.sigmoid(eta_logit)))
    return out, w


def published(name, w0, q, k, v, beta_logit, alpha_logit):
    """One head of one sequence, token by token, from the papers' recurrences."""
    if name == "ttt_linear":
        return ttt_linear_published(w0, q, k, v, beta_logit)
    q, k = l2n(q), l2n(k)
    beta, alpha = jax.nn.sigmoid(beta_logit), jax.nn.sigmoid(alpha_logit)
    eye = jnp.eye(D)

    def step(w, inputs):
        q_t, k_t, v_t, b_t, a_t = inputs
        write = b_t * jnp.outer(v_t, k_t)
        if name == "linear_attention":          # W_t = W_{t-1} + b v k^T
            w = w + write
        elif name == "mamba2":                  # W_t = a W_{t-1} + b v k^T
            w = a_t * w + write
        elif name == "deltanet":                # W_t = W_{t-1}(I - b k k^T) + b v k^T
            w = w @ (eye - b_t * jnp.outer(k_t, k_t)) + write
        else:                                   # W_t = a W_{t-1}(I - b k k^T) + b v k^T
            w = a_t * w @ (eye - b_t * jnp.outer(k_t, k_t)) + write
        return w, w @ q_t                       # read after the write

    w, out = jax.lax.scan(step, w0, (q, k, v, beta, alpha))
    return out, w


def inputs(seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    w0 = 0.3 * jax.random.normal(keys[0], (H, D, D))
    q, k, v = (jax.random.normal(kk, (B, T, H, D)) for kk in keys[1:4])
    beta_logit = jax.random.normal(keys[4], (B, T, H))
    alpha_logit = 2.0 + jax.random.normal(keys[5], (B, T, H))
    return w0, q, k, v, beta_logit, alpha_logit


def spec_of(name, path="chunked"):
    return spec_from_options({**DEFAULTS, **PRESETS[name].PRESET, "path": path,
                              "memory_chunk_size": C, "chunk_size": C})


def run_engine(spec, args, state=None, streaming=False):
    w0, q, k, v, beta_logit, alpha_logit = args
    plain = {"k": k, "v": v, "q": q, "eta": beta_logit}
    if spec.decay:
        plain["alpha"] = alpha_logit
    if state is None:
        state = initial_state(spec, {"memory": {"w": w0}}, B)
    return apply_self_modifying(spec, state, jnp.zeros_like(q), plain, None, {}, streaming)


def run_published(name, args):
    w0, q, k, v, beta_logit, alpha_logit = args
    per_head = jax.vmap(lambda w, *xs: published(name, w, *xs), in_axes=(0, 1, 1, 1, 1, 1),
                        out_axes=(1, 0))
    return jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0, 0))(
        w0, q, k, v, beta_logit, alpha_logit)


# Every preset on the chunked path; the per-token oracle path (read after the
# write, the gated DGD factor) through the preset that uses every option.
@pytest.mark.parametrize("name, path", [(name, "chunked") for name in sorted(PRESETS)]
                         + [("gated_deltanet", "oracle")])
def test_preset_equals_its_published_recurrence(name, path):
    args = inputs()
    spec = spec_of(name, path)
    y, state = jax.jit(lambda *a: run_engine(spec, a))(*args)
    ref, w_final = jax.jit(lambda *a: run_published(name, a))(*args)
    np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(state.main.current["w"], w_final, rtol=2e-5, atol=2e-5)

    probe = jax.random.normal(jax.random.key(9), ref.shape)

    def loss_engine(*a):
        return jnp.sum(run_engine(spec, a)[0] * probe)

    def loss_ref(*a):
        return jnp.sum(run_published(name, a)[0] * probe)

    grads = jax.jit(jax.grad(loss_engine, argnums=tuple(range(6))))(*args)
    expected = jax.jit(jax.grad(loss_ref, argnums=tuple(range(6))))(*args)
    labels = ("w0", "q", "k", "v", "beta", "alpha")
    for label, g, e in zip(labels, grads, expected, strict=True):
        if label == "alpha" and not spec.decay:
            continue
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=2e-5, err_msg=f"{name} d{label}")


def test_streaming_equals_one_pass_at_any_cut():
    args = inputs(1)
    spec = spec_of("gated_deltanet")          # decay, DGD and gates: every option
    run = jax.jit(run_engine, static_argnums=0, static_argnames="streaming")
    y, final = run(spec, args)
    for cut in (5, 29):                        # inside a chunk, near the end
        first = [args[0]] + [a[:, :cut] for a in args[1:]]
        second = [args[0]] + [a[:, cut:] for a in args[1:]]
        y1, state = run(spec, first)
        y2, state = run(spec, second, state=state, streaming=True)
        np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.main.current["w"], final.main.current["w"],
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear_attention", "gated_deltanet"])
def test_the_mixer_is_causal_and_trains(name):
    cfg = ml_collections.ConfigDict(dict(d_model=16, n_heads=2, dtype="float32",
                                         self_modifying=dict(memory_chunk_size=4)))
    graphdef, params = nnx.split(PRESETS[name](cfg, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, None)[0])
    x = jax.random.normal(jax.random.key(0), (1, 12, 16))
    y = forward(params, x)
    x2 = x.at[:, 7].add(1.0)
    y2 = forward(params, x2)
    np.testing.assert_array_equal(y[:, :7], y2[:, :7])
    assert not np.allclose(y[:, 7:], y2[:, 7:])
    grads = jax.jit(jax.grad(lambda p: jnp.sum(forward(p, x) ** 2)))(params)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) > 0 for g in leaves) >= len(leaves) - 1


def test_a_mixer_pattern_alternates_layers_samba_style():
    """``model.mixer="mamba2,attention"``: layers cycle through the pattern (the
    attention layers with their sliding window); FLOPs add up layer by layer;
    a pattern that does not divide the layers is one ConfigError."""
    from nl_jax import config as config_lib
    from nl_jax.errors import ConfigError
    from nl_jax.models import attention, flops, lm
    config = config_lib.load_config_file("experiments/baselines/samba.py")
    config.model.n_layers, config.model.d_model, config.model.d_ff = 4, 32, 64
    model = nnx.eval_shape(lambda: lm.LanguageModel(config.model, rngs=nnx.Rngs(0)))
    kinds = [type(block.mixer) for block in model.blocks]
    assert kinds == [baselines.Mamba2, attention.CausalSelfAttention] * 2
    assert model.blocks[1].mixer.window == 32
    parts = flops.forward_flops_breakdown(config, 128)
    per_layer = {}
    for name in ("mamba2", "attention"):
        one = ml_collections.ConfigDict(config.model.to_dict())
        one.mixer = name
        per_layer[name] = flops.MIXER_FLOPS[name](one, 128)
    assert parts["mixer"] == pytest.approx(2 * per_layer["mamba2"] + 2 * per_layer["attention"])
    config.model.n_layers = 3
    with pytest.raises(ConfigError, match="multiple of it"):
        lm.layer_mixers(config.model)
    config.model.mixer = "mamba2,attenton"
    with pytest.raises(ConfigError, match="'attenton' is not known"):
        lm.layer_mixers(config.model)
