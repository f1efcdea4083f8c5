"""Titans mixers (LMM, MAG, MAC, MAL): shapes, gradients, causality, streaming, paths."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.memory.maps import l2_normalize
from nl_jax.models import titans
from nl_jax.models.attention import causal_attention
from nl_jax.models.layers import rope
from nl_jax.models.lm import LanguageModel

VARIANTS = ["NeuralMemoryMixer", "MemoryAsGate", "MemoryAsContext", "MemoryAsLayer"]
MIXER_NAMES = {"NeuralMemoryMixer": "titans_lmm", "MemoryAsGate": "titans_mag",
               "MemoryAsContext": "titans_mac", "MemoryAsLayer": "titans_mal"}
B, T, D, H = 2, 32, 32, 2
SEGMENT, WINDOW, CHUNK = 8, 6, 4


def model_cfg(mixer="titans_mag", **memory) -> ml_collections.ConfigDict:
    mem = dict(kind="linear", objective="l2", momentum=True, weight_decay=True, dgd=False,
               mlp_depth=2, mlp_expansion=2, chunk_size=CHUNK, path="chunked",
               remat_every=1, segment_len=SEGMENT, n_persistent=2, window=WINDOW)
    mem.update(memory)
    return ml_collections.ConfigDict(dict(
        mixer=mixer, mlp="swiglu", vocab_size=64, d_model=D, n_layers=1, n_heads=H,
        d_ff=64, tie_embeddings=True, rope_theta=10000.0, attention_window=0,
        norm_eps=1e-6, init_std=0.02, dtype="float32", memory=mem))


def build(name, **memory):
    return getattr(titans, name)(model_cfg(MIXER_NAMES[name], **memory), rngs=nnx.Rngs(0))


def jitted(model):
    """A jitted ``(params, x, state) -> (y, state)`` and the model's params."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(p, x, state):
        return nnx.merge(graphdef, p, rest)(x, state)

    return run, params


@functools.cache
def shared_run(name):
    """One jitted default model per variant, shared by tests (fewer compiles)."""
    return jitted(build(name))


def inputs(seed=1, t=T):
    return jax.random.normal(jax.random.key(seed), (B, t, D), jnp.float32)


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shapes_and_gradients(name):
    run, params = shared_run(name)
    x = inputs()

    def loss(p):
        y = run(p, x, None)[0]
        return jnp.sum(jnp.square(y - 0.1 * x)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert y.shape == (B, T, D) and bool(jnp.all(jnp.isfinite(y)))
    grads = flat(nnx.to_pure_dict(grads))
    memory_init = [g for k, g in grads.items() if "init_params" in k]
    gate_kernels = [g for k, g in grads.items() if "gates/kernel" in k]
    assert memory_init and gate_kernels
    for g in memory_init + gate_kernels + list(grads.values()):
        assert bool(jnp.all(jnp.isfinite(g)))
    for g in memory_init + gate_kernels:
        assert float(jnp.max(jnp.abs(g))) > 0.0


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_and_memory_carries_the_past(name):
    """Outputs at t never see tokens > t; an early token reaches far outputs via the memory."""
    run, params = shared_run(name)
    x = inputs()
    y, _ = run(params, x, None)
    t0 = 17
    y_late, _ = run(params, x.at[:, t0].add(1.0), None)
    np.testing.assert_allclose(y_late[:, :t0], y[:, :t0], atol=1e-6)
    assert float(jnp.max(jnp.abs(y_late[:, t0] - y[:, t0]))) > 1e-4
    # Token 1 is outside the attention window / MAC segment of every t >= 24:
    # only the memory can carry it there.
    y_early, _ = run(params, x.at[:, 1].add(1.0), None)
    assert float(jnp.max(jnp.abs(y_early[:, 24:] - y[:, 24:]))) > 1e-3


@pytest.mark.parametrize("cuts", [(16,), (5, 13, 14, 31)])
@pytest.mark.parametrize("name", ["NeuralMemoryMixer", "MemoryAsGate", "MemoryAsContext",
                                  "MemoryAsLayer"])
def test_streaming_equals_one_pass(name, cuts):
    """Segment by segment == one pass, at a cut on a chunk and segment boundary (16)
    and at cuts off them (chunk 4, MAC segment 8; a one-token segment): the inputs
    since the last boundary are re-run in front of the next segment.  MAG and MAL
    also carry the sliding-window key/value cache across the cuts."""
    run, params = shared_run(name)
    x = inputs()
    y, state = run(params, x, None)
    ys, s = [], None
    for lo, hi in zip((0,) + cuts, cuts + (T,), strict=True):
        y_part, s = run(params, x[:, lo:hi], s)
        ys.append(y_part)
    np.testing.assert_allclose(jnp.concatenate(ys, 1), y, atol=2e-5)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_an_empty_segment_changes_nothing():
    run, params = shared_run("NeuralMemoryMixer")
    x = inputs()
    _, s10 = run(params, x[:, :10], None)
    y, s = run(params, x[:, :0], s10)
    assert y.shape == (B, 0, D)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert run(params, x[:, :0], None)[0].shape == (B, 0, D)


def test_streaming_state_keeps_the_inputs_since_the_last_chunk():
    """After 10 tokens (chunk 4) the state holds the memory at token 8 and the
    inputs of tokens 8 and 9."""
    run, params = shared_run("NeuralMemoryMixer")
    x = inputs()
    _, s10 = run(params, x[:, :10], None)
    _, s8 = run(params, x[:, :8], None)
    np.testing.assert_array_equal(s10.pending, x[:, 8:10])
    assert s8.pending.shape == (B, 0, D)
    for a, b in zip(jax.tree.leaves(s10.aligned), jax.tree.leaves(s8.aligned), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_mac_partial_last_segment_matches_the_longer_pass():
    """A trailing partial segment (T % segment_len != 0) gives the causal prefix outputs."""
    run, params = shared_run("MemoryAsContext")
    x = inputs()
    y, _ = run(params, x, None)
    y_short, _ = run(params, x[:, :2 * SEGMENT + 3], None)
    np.testing.assert_allclose(y_short, y[:, :2 * SEGMENT + 3], atol=1e-5)


def test_memory_learns_a_repeated_token_without_overshooting():
    """At init, 64 copies of one token (C = 16, keys all alike) teach M k = v.

    Regression for the chunked step: with a fixed theta = 0.05 the 16 summed
    momentum steps of a chunk overshoot and ||M|| grows ~8x per chunk.
    """
    cfg = model_cfg("titans_lmm", chunk_size=16)
    core = titans.MemoryCore(cfg, titans.memory_spec_from_config(cfg), rngs=nnx.Rngs(0))
    x = jnp.broadcast_to(jax.random.normal(jax.random.key(5), (B, 1, D)), (B, 64, D))
    _, state = jax.jit(lambda x: core.memorize(x))(x)

    def split(a):
        return a.reshape(B, 64, H, D // H)[:, -1]

    k = l2_normalize(split(jax.nn.silu(core.conv_k(core.wk(x))[0])))
    v = split(jax.nn.silu(core.conv_v(core.wv(x))[0]))
    w = state.memory.params["w0"]  # [B, H, d_v, d_k]
    error = jnp.linalg.norm(jnp.einsum("bhij,bhj->bhi", w, k) - v, axis=-1)
    assert float(jnp.max(error / jnp.linalg.norm(v, axis=-1))) < 0.15
    assert float(jnp.max(jnp.linalg.norm(w, axis=(-2, -1)))) < 1.5 * float(
        jnp.max(jnp.linalg.norm(v, axis=-1)))


def _oracle_and_chunked(name, kind, with_grads):
    x = inputs(t=2 * SEGMENT)
    results = []
    for path in ("oracle", "chunked"):
        run, params = jitted(build(name, kind=kind, path=path))
        if not with_grads:
            results.append((run(params, x, None)[0], {}))
            continue

        def loss(p, run=run):
            y = run(p, x, None)[0]
            return jnp.sum(jnp.sin(y)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((y, flat(nnx.to_pure_dict(grads))))
    return results


def test_oracle_path_matches_chunked_path_values_and_gradients():
    """LMM with an MLP memory: same output and parameter gradients as the per-token oracle."""
    (y_o, g_o), (y_c, g_c) = _oracle_and_chunked("NeuralMemoryMixer", "mlp", True)
    np.testing.assert_allclose(y_c, y_o, rtol=1e-4, atol=1e-5)
    assert g_o.keys() == g_c.keys() and any("init_params" in k for k in g_o)
    for key in g_o:
        np.testing.assert_allclose(g_c[key], g_o[key], rtol=2e-3, atol=2e-5, err_msg=key)


def test_oracle_path_matches_chunked_path_in_mac():
    (y_o, _), (y_c, _) = _oracle_and_chunked("MemoryAsContext", "linear", False)
    np.testing.assert_allclose(y_c, y_o, rtol=1e-4, atol=1e-5)


def test_mac_segment_remat_keeps_values_and_gradients():
    x = inputs(t=3 * SEGMENT + 3)     # full segments under the scan, plus a tail
    results = []
    for remat in (False, True):
        run, params = jitted(build("MemoryAsContext", remat_segments=remat))

        def loss(p, run=run):
            y = run(p, x, None)[0]
            return jnp.sum(jnp.sin(y)), y

        fn = jax.value_and_grad(loss, has_aux=True)
        n_remat = str(jax.make_jaxpr(lambda p, run=run: run(p, x, None))(params)).count("remat")
        (_, y), grads = jax.jit(fn)(params)
        results.append((y, flat(nnx.to_pure_dict(grads)), n_remat))
    (y0, g0, n0), (y1, g1, n1) = results
    assert n1 > n0          # the segment body really is rematerialised
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for key in g0:
        scale = max(1.0, float(np.abs(g0[key]).max()))
        np.testing.assert_allclose(g1[key], g0[key], rtol=0, atol=1e-5 * scale, err_msg=key)


def test_sliding_window_attention_matches_causal_attention():
    """The streaming masked attention equals causal_attention(window, bias_len)."""
    attn = titans.SlidingWindowAttention(model_cfg(), WINDOW, 3, rngs=nnx.Rngs(2))
    graphdef, state = nnx.split(attn)

    @jax.jit
    def both(state, x):
        attn = nnx.merge(graphdef, state)

        def split(a):
            return a.reshape(a.shape[:2] + (H, D // H))

        pos = jnp.arange(x.shape[1])[None]
        q = rope(split(attn.wq(x)), pos)
        k = rope(split(attn.wk(x)), pos)
        p = attn.persistent[...][None]
        pk = jnp.broadcast_to(split(attn.wk(p)), (B, 3, H, D // H))
        pv = jnp.broadcast_to(split(attn.wv(p)), (B, 3, H, D // H))
        ref = causal_attention(q, jnp.concatenate([pk, k], 1),
                               jnp.concatenate([pv, split(attn.wv(x))], 1),
                               window=WINDOW, bias_len=3)
        return attn(x, None)[0], ref

    y, ref = both(state, inputs(t=12))
    np.testing.assert_allclose(y, ref, atol=1e-5)


@pytest.mark.parametrize("name,memory,key", [
    ("NeuralMemoryMixer", dict(kind="matrix"), "model.memory.kind"),
    ("NeuralMemoryMixer", dict(objective="l1"), "model.memory.objective"),
    ("NeuralMemoryMixer", dict(chunk_size=0), "model.memory.chunk_size"),
    ("NeuralMemoryMixer", dict(momentum="yes"), "model.memory.momentum"),
    ("NeuralMemoryMixer", dict(path="fast"), "model.memory.path"),
    ("NeuralMemoryMixer", dict(grad_clip=-1.0), "model.memory.grad_clip"),
    ("NeuralMemoryMixer", dict(grad_clip="1"), "model.memory.grad_clip"),
    ("NeuralMemoryMixer", dict(chunk=4), "model.memory.chunk"),
    ("MemoryAsContext", dict(segment_len=0), "model.memory.segment_len"),
    ("MemoryAsContext", dict(n_persistent=-1), "model.memory.n_persistent"),
    ("MemoryAsGate", dict(window=0), "model.memory.window"),
    ("MemoryAsContext", dict(remat_segments="yes"), "model.memory.remat_segments"),
])
def test_bad_memory_config_names_the_key(name, memory, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(name, **memory)


def test_missing_memory_dict_is_a_config_error():
    cfg = model_cfg()
    del cfg["memory"]
    with pytest.raises(ConfigError, match=r"model\.memory"):
        titans.MemoryAsGate(cfg, rngs=nnx.Rngs(0))


def test_tiny_titans_mag_lm_learns_a_repeated_batch():
    cfg = model_cfg("titans_mag")
    model = LanguageModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(3), (4, 17), 0, cfg.vocab_size)
    opt = optax.adamw(1e-2)

    def loss_fn(p):
        logits, _ = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(p, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = opt.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = opt.init(params)
    losses = []
    for _ in range(8):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("t, window, start", [(12, 5, 0), (16, 4, 0), (3, 5, 0),
                                              (11, 4, 9), (7, 7, 2)])
def test_blockwise_window_attention_equals_full_masked_attention(t, window, start):
    """Values and gradients of the O(T window) form equal masked attention over all keys."""
    b, h, d, n_p, past = 2, 2, 8, 3, window - 1
    ks = jax.random.split(jax.random.PRNGKey(t + window + start), 5)
    q = jax.random.normal(ks[0], (b, t, h, d))
    keys = jax.random.normal(ks[1], (b, past + t, h, d))
    values = jax.random.normal(ks[2], (b, past + t, h, d))
    prefix = (jax.random.normal(ks[3], (b, n_p, h, d)), jax.random.normal(ks[4], (b, n_p, h, d)))
    pos = start + jnp.arange(t)
    key_pos = jnp.concatenate([start - past + jnp.arange(past), pos])

    def full(q, keys, values, pk, pv):
        mask = ((key_pos[None] <= pos[:, None]) & (key_pos[None] > pos[:, None] - window)
                & (key_pos[None] >= 0))
        mask = jnp.concatenate([jnp.ones((t, n_p), bool), mask], axis=1)
        return titans.masked_attention(q, jnp.concatenate([pk, keys], 1),
                                       jnp.concatenate([pv, values], 1), mask)

    def blockwise(q, keys, values, pk, pv):
        return titans.sliding_window_attention(q, keys, values, pos, key_pos, window,
                                               (pk, pv))

    w = jax.random.normal(jax.random.PRNGKey(0), (b, t, h, d))

    @jax.jit        # one compile per case (op by op, a case took ~9 s of CPU)
    def values_and_grads(*args):
        return [(f(*args), jax.grad(lambda *a, f=f: jnp.sum(w * f(*a)), argnums=range(5))(*args))
                for f in (blockwise, full)]

    (y_blockwise, g_blockwise), (y_full, g_full) = values_and_grads(q, keys, values, *prefix)
    np.testing.assert_allclose(y_blockwise, y_full, atol=1e-5)
    for a, g in zip(g_blockwise, g_full, strict=True):
        np.testing.assert_allclose(a, g, atol=1e-5)
