"""Hope's self-modifying memories through the chunk-scan kernels (``path="kernel"``,
Pallas interpret mode on the CPU) == the chunked path (held to the per-token
oracle by test_self_modifying), values, states and gradients."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from nl_jax.models.self_modifying import SelfModifyingTitans
from tests.test_self_modifying import B, assert_close, assert_close_trees, inputs, make_cfg


def _pair(**sm):
    """The same (randomised) parameters under the kernel and the chunked path."""
    sm.setdefault("lr", 0.9)
    kernel = SelfModifyingTitans(make_cfg(path="kernel", **sm), rngs=nnx.Rngs(0))
    chunked = SelfModifyingTitans(make_cfg(path="chunked", **sm), rngs=nnx.Rngs(0))
    params = nnx.state(kernel, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    pure = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (jax.random.uniform(next(keys), leaf.shape, minval=-1.0, maxval=1.5)
                            if "bias" in jax.tree_util.keystr(path) else leaf),
        params.to_pure_dict())
    nnx.replace_by_pure_dict(params, pure)
    nnx.update(kernel, params)
    nnx.update(chunked, params)
    return kernel, chunked


def _loss(gdef, params, x, state=None):
    y, new_state = nnx.merge(gdef, params)(x, state)
    return jnp.sum(jnp.sin(3.0 * y)), (y, new_state)


@pytest.mark.parametrize("sm,gradients", [
    (dict(memory="mlp", chunk_size=4, memory_chunk_size=3), True),          # Hope
    (dict(memory="linear", chunk_size=2, memory_chunk_size=4, dgd=False, objective="dot",
          momentum=False), False),
])
def test_kernel_path_equals_chunked_path(sm, gradients):
    """T = 13 (the last chunk of both stages partial): values, final states, and (Hope)
    the gradients w.r.t. every parameter (initial memory states included) and the
    input.  (Interpret mode compiles each kernel body into the program, so the
    ablation checks values only.)"""
    kernel, chunked = _pair(**sm)
    x = inputs(13)
    if gradients:
        run = jax.jit(jax.grad(_loss, argnums=(1, 2), has_aux=True), static_argnums=0)
    else:
        run = jax.jit(lambda gdef, p, x: (None, _loss(gdef, p, x)[1]), static_argnums=0)
    results = []
    for mixer in (kernel, chunked):
        gdef, params = nnx.split(mixer)
        results.append(run(gdef, params, x))
    (g_k, (y_k, s_k)), (g_c, (y_c, s_c)) = results
    assert float(jnp.abs(y_c).max()) > 0.1
    assert_close(y_k, y_c, 1e-5)
    assert_close_trees(s_k, s_c, 1e-5)
    if gradients:
        assert_close_trees(g_k, g_c, 1e-4)
        g_init = g_k[0]["memories"]["memory"]
        assert max(float(jnp.abs(v[...]).max()) for v in jax.tree.leaves(g_init)) > 0


def test_kernel_path_streams_from_inside_a_chunk():
    """A segment that starts inside a chunk of both stages (5 tokens already seen:
    offsets 5 mod 4 and 5 mod 3), from the state the chunked path left: the
    kernel path's outputs and state == the chunked path's on the same segment."""
    kernel, chunked = _pair(memory="mlp", chunk_size=4, memory_chunk_size=3)
    x = inputs(11, seed=2)
    gdef_c, params_c = nnx.split(chunked)
    _, first = jax.jit(lambda p, x: nnx.merge(gdef_c, p)(x))(params_c, x[:, :5])
    outs = []
    for mixer in (kernel, chunked):
        gdef, params = nnx.split(mixer)
        outs.append(jax.jit(lambda p, x, s, g=gdef: nnx.merge(g, p)(x, s))(
            params, x[:, 5:], first))
    assert outs[0][0].shape == (B, 6, outs[0][0].shape[-1])
    assert_close(outs[0][0], outs[1][0], 1e-5)
    assert_close_trees(outs[0][1], outs[1][1], 1e-5)


def test_kernel_path_lowers_for_cuda_as_the_reference_scan():
    """Hope's chunk bodies do not lower through Pallas Triton (they slice values): on
    a CUDA GPU path='kernel' runs the jnp reference scan, forward and backward,
    instead of failing to lower (checked by lowering for CUDA from this host)."""
    kernel, _ = _pair(memory="mlp", chunk_size=4, memory_chunk_size=4)
    gdef, params = nnx.split(kernel)
    x = inputs(9)
    fn = jax.grad(lambda p, x: _loss(gdef, p, x)[0], argnums=(0, 1))   # forward included
    text = jax.jit(fn).trace(params, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" not in text and "tpu_custom_call" not in text


def test_auto_path_resolves_by_the_target_platform():
    """path='auto': the kernels on a TPU (and on a CUDA GPU where the level has a
    Triton body: the Titans linear memory), the XLA chunked path on the CPU and
    whenever kernels are ruled out (the teach signal's second derivative)."""
    from nl_jax.memory import MemorySpec
    from nl_jax.memory.kernel_path import resolve, target_platform

    assert jax.default_backend() == "cpu"
    mixer = SelfModifyingTitans(make_cfg(path="auto"), rngs=nnx.Rngs(0))
    assert mixer.spec.path == "chunked"
    linear, mlp = MemorySpec(kind="linear", path="auto"), MemorySpec(kind="mlp", path="auto")
    for platform, kernels, want_linear, want_mlp, want_hope in [
            ("tpu", True, "kernel", "kernel", "kernel"),
            ("gpu", True, "kernel", "chunked", "chunked"),
            ("cpu", True, "chunked", "chunked", "chunked"),
            ("tpu", False, "chunked", "chunked", "chunked")]:
        with target_platform(platform, kernels=kernels):
            assert linear.resolved().path == want_linear
            assert mlp.resolved().path == want_mlp
            assert resolve("auto", gpu_kernel=False) == want_hope
            assert resolve("oracle", gpu_kernel=True) == "oracle"
            hope = SelfModifyingTitans(make_cfg(path="auto"), rngs=nnx.Rngs(0)).spec
            assert hope.path == want_hope
