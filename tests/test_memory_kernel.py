"""The Pallas kernel path (``kernels/linear_memory.py``, Pallas interpret mode on the
CPU) against its jnp reference and against the per-token oracle."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nl_jax.errors import ConfigError
from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
from nl_jax_kernels import linear_memory
from tests.memory_helpers import perturbed, random_inputs
from tests.test_memory_equivalence import _loss_and_grads

B, T, H, D = 2, 37, 2, 8


def _recurrence_inputs(seed, n=3, b=2, h=2, c=8, d_k=8, d_v=4):
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    q = jax.random.normal(ks[0], (n, b, h, c, d_k))
    k = jax.random.normal(ks[1], (n, b, h, c, d_k)) / np.sqrt(d_k)
    e0 = jax.random.normal(ks[2], (n, b, h, c, d_v))
    gate = jnp.tril(jax.random.uniform(ks[3], (n, b, h, c, c), maxval=0.1))
    rows = jax.random.uniform(ks[4], (n, b, h, len(linear_memory.ROWS), c))
    mt0 = jax.random.normal(ks[5], (b, h, d_k, d_v))
    st0 = jax.random.normal(ks[6], (b, h, d_k, d_v))
    return q, k, e0, gate, rows, mt0, st0


@pytest.mark.parametrize("body,save_every", [("mosaic", 1), ("mosaic", 2), ("triton", 2)])
@pytest.mark.parametrize("momentum,grad_clip", [(True, 0.0), (False, 0.5), (True, 0.5)])
def test_kernel_equals_reference_values_and_gradients(momentum, grad_clip, body, save_every):
    """The linear memory through the chunk-scan kernels, both bodies: blocking, the
    state carried across chunks (Mosaic: VMEM scratch over a sequential grid
    axis; Triton: a loop in one program), its init and final write, the saved
    boundary states and the backward kernel (N = 3 chunks: with save_every 2
    the last segment is partial).  (Kernels and reference share ``chunk_maths``;
    the oracle tests below check the maths.)"""
    dims = dict(c=8, d_k=8, d_v=4) if body == "mosaic" else dict(c=16, d_k=16, d_v=16)
    *chunks, mt0, st0 = _recurrence_inputs(0, **dims)
    states = (mt0, st0) if momentum else (mt0,)
    kw = dict(coef=3.0, momentum=momentum, grad_clip=grad_clip, body=body,
              save_every=save_every)

    def kernel(*a):
        y, mt, st = linear_memory.chunk_recurrence(*a, interpret=True, **kw)
        return (y, mt, st) if momentum else (y, mt)

    def reference(*a):
        y, final = linear_memory.reference(*a[:5], a[5:], coef=3.0, momentum=momentum,
                                           grad_clip=grad_clip)
        return (y, *final)

    args = (*chunks, *states)
    out, ref = kernel(*args), reference(*args)
    for a, b in zip(out, ref, strict=True):
        assert np.abs(np.asarray(b)).max() > 0.1
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    if not momentum:        # no S in the kernel: st0 comes back untouched
        assert linear_memory.chunk_recurrence(*args, st0, interpret=True, **kw)[2] is st0
    weights = [jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)) for x in ref]

    def loss(fn):
        return lambda *a: sum(jnp.sum(w * o) for w, o in zip(weights, fn(*a), strict=True))

    argnums = tuple(range(len(args)))
    grads = jax.grad(loss(kernel), argnums=argnums)(*args)
    grads_ref = jax.grad(loss(reference), argnums=argnums)(*args)
    for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True)):
        # elementwise at 1e-5 of the gradient's largest entry (d = 16 sums in another
        # order than the reference's; 1e-5 absolute at d = 8), and 1e-5 in norm
        atol = 1e-5 * max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=f"grad {i}")
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), f"grad {i}"


def test_kernel_state_starts_from_mt0_and_is_written_after_the_last_chunk():
    """One chunk with zero errors and no decay: the state passes through unchanged."""
    q, k, e0, gate, rows, mt0, st0 = _recurrence_inputs(1, n=1)
    ends = {"beta": 1.0, "end_beta": 1.0, "end_f": 0.0, "end_m": 1.0}
    rows = jnp.stack([jnp.full(q.shape[:-1], ends.get(name, 0.0))
                      for name in linear_memory.ROWS], axis=-2)
    y, mt, st = linear_memory.chunk_recurrence(
        q, k, jnp.zeros_like(e0), gate, rows, mt0, st0, coef=0.0, momentum=True,
        interpret=True)
    np.testing.assert_array_equal(mt, mt0)
    np.testing.assert_array_equal(st, st0)
    np.testing.assert_allclose(y[0], jnp.einsum("bhcd,bhde->bhce", q[0], mt0), rtol=1e-6)


CASES = [
    # objective, momentum, weight_decay, dgd, chunk sizes, grad_clip
    ("l2", True, True, True, (1, 4), 0.0),
    ("l2", True, True, False, (8,), 1.5),
    ("dot", False, False, True, (4,), 0.0),
    ("l2", False, True, False, (16,), 0.0),
]


@pytest.mark.parametrize("objective,momentum,decay,dgd,chunks,grad_clip", CASES)
def test_kernel_path_matches_oracle(objective, momentum, decay, dgd, chunks, grad_clip):
    """apply_memory with path='kernel' == the per-token oracle: T = 37 (last chunk
    partial), values 1e-5, gradients w.r.t. inputs, gates and initial state 1e-4."""
    inputs = random_inputs(0, B, T, H, D, D)
    for chunk in chunks:
        spec = MemorySpec(kind="linear", objective=objective, momentum=momentum,
                          weight_decay=decay, dgd=dgd, chunk_size=chunk, path="oracle",
                          grad_clip=grad_clip)
        params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
        y_o, s_o, g_o = _loss_and_grads(spec, params, inputs)
        y_k, s_k, g_k = _loss_and_grads(dataclasses.replace(spec, path="kernel"), params,
                                        inputs)
        assert np.abs(np.asarray(y_o)).max() > 0.1
        np.testing.assert_allclose(y_k, y_o, atol=1e-5, err_msg=f"y, C={chunk}")
        for a, b in zip(jax.tree.leaves(s_k), jax.tree.leaves(s_o), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"state, C={chunk}")
        for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_o), strict=True):
            scale = max(1.0, float(np.abs(np.asarray(b)).max()))
            np.testing.assert_allclose(a, b, atol=1e-4 * scale, err_msg=f"grad, C={chunk}")


def test_kernel_path_streams_segment_by_segment():
    """Two segments (the first a multiple of C) with the state passed on == one pass."""
    spec = MemorySpec(kind="linear", chunk_size=4, dgd=True, path="kernel")
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
    inputs = random_inputs(3, B, 30, H, D, D)
    y_all, s_all = apply_memory(spec, params, *inputs)
    y_1, s_1 = apply_memory(spec, params, *(x[:, :12] for x in inputs))
    y_2, s_2 = apply_memory(spec, params, *(x[:, 12:] for x in inputs), state=s_1)
    np.testing.assert_allclose(jnp.concatenate([y_1, y_2], 1), y_all, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_2), jax.tree.leaves(s_all), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("kind,objective,momentum,dgd,grad_clip,remat_every", [
    ("mlp", "l2", True, True, 1.0, 2),
    ("mlp", "dot", False, False, 0.0, 1),
    ("linear", "huber", True, False, 0.5, 3),
])
def test_kernel_path_of_the_chunk_step_equals_the_chunked_path(kind, objective, momentum,
                                                               dgd, grad_clip, remat_every):
    """Levels without the linear fast path (the MLP memory, other objectives) run
    ``chunked.py``'s chunk step in the chunk-scan kernels, forward and backward
    (interpret mode): == the chunked path (held to the oracle by
    test_memory_equivalence), values, final state and every gradient, T = 37
    (last chunk partial), N = 5 chunks with ``remat_every`` chunks per saved
    boundary state (2, 3: the last segment partial)."""
    spec = MemorySpec(kind=kind, objective=objective, momentum=momentum, dgd=dgd,
                      grad_clip=grad_clip, chunk_size=8, remat_every=remat_every,
                      mlp_expansion=2)
    params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
    inputs = random_inputs(4, B, T, H, D, D)
    y_c, s_c, g_c = _loss_and_grads(spec, params, inputs)
    y_k, s_k, g_k = _loss_and_grads(dataclasses.replace(spec, path="kernel"), params, inputs)
    assert np.abs(np.asarray(y_c)).max() > 0.1
    np.testing.assert_allclose(y_k, y_c, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s_k), jax.tree.leaves(s_c), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    grads = list(zip(jax.tree.leaves(g_k), jax.tree.leaves(g_c), strict=True))
    assert sum(float(np.abs(np.asarray(b)).max()) > 0 for _, b in grads) >= 6
    for i, (a, b) in enumerate(grads):       # (unused gates: exactly zero on both)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), f"grad {i}"


def test_kernel_rejects_misshapen_or_non_fp32_terms():
    q, k, e0, gate, rows, mt0, st0 = _recurrence_inputs(0)
    kw = dict(coef=2.0, momentum=True, interpret=True)
    with pytest.raises(ValueError, match=r"rows .* must be"):
        linear_memory.chunk_recurrence(q, k, e0, gate, rows[..., :5, :], mt0, st0, **kw)
    with pytest.raises(ValueError, match=r"float32 .*'q': 'bfloat16'"):
        linear_memory.chunk_recurrence(q.astype(jnp.bfloat16), k, e0, gate, rows, mt0, st0,
                                       **kw)
    with pytest.raises(ValueError, match="needs st0"):
        linear_memory.chunk_recurrence(q, k, e0, gate, rows, mt0, **kw)


def test_kernel_path_under_sharding_rules_runs_per_shard_and_matches_one_device():
    """With the trainer's rules active (8 CPU devices: batch over data x fsdp, heads
    over tensor) the kernel runs inside shard_map on each device's rows and heads;
    values and gradients equal the one-device run.  Batches of 4 (split over data
    x fsdp) and 2 (over data only) and momentum on and off."""
    from experiments import base
    from nl_jax.sharding import use_rules
    from nl_jax.train.mesh import make_mesh

    rules = base.get_config().sharding.rules
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    for batch, momentum in ((4, True), (2, False)):
        spec = MemorySpec(kind="linear", chunk_size=4, dgd=True, path="kernel",
                          momentum=momentum)
        params = perturbed(init_memory_params(spec, jax.random.PRNGKey(1), H, D, D), 2)
        inputs = random_inputs(4, batch, 21, H, D, D)

        def loss(params, *x, spec=spec):
            y, state = apply_memory(spec, params, *x)
            return jnp.sum(jnp.sin(y)) + jnp.sum(state.params["w0"] ** 2), y

        def grad(loss=loss):      # a new function for each jit: rules are not a cache key
            return jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True)

        (_, y_one), g_one = jax.jit(grad())(params, *inputs)
        with use_rules(mesh, rules):
            sharded = jax.jit(grad())
            assert "shard_map" in str(sharded.trace(params, *inputs).jaxpr)
            (_, y_sh), g_sh = sharded(params, *inputs)
        np.testing.assert_allclose(y_sh, y_one, atol=1e-5)
        for a, b in zip(jax.tree.leaves(g_sh), jax.tree.leaves(g_one), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(np.abs(b).max())))


def test_local_mesh_axes_keeps_only_dividing_splits():
    from nl_jax.sharding import local_mesh_axes, use_rules
    from nl_jax.train.mesh import make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (("batch", ("data", "fsdp")), ("heads", "tensor"))
    assert local_mesh_axes(("batch", "heads"), (8, 2)) is None        # no rules active
    with use_rules(mesh, rules):
        assert local_mesh_axes(("batch", "heads"), (8, 2))[1] == P(("data", "fsdp"), "tensor")
        assert local_mesh_axes(("batch", "heads"), (6, 2))[1] == P("data", "tensor")
        assert local_mesh_axes(("batch", "heads"), (1, 3))[1] == P(None, None)  # replicated
    with use_rules(make_mesh({"data": 1}, jax.devices()[:1]), rules):
        assert local_mesh_axes(("batch", "heads"), (8, 2)) is None    # one device


def test_kernel_path_on_another_backend_is_a_config_error(monkeypatch):
    """The CLI turns ConfigError into exit 2 with this one line (no traceback)."""
    spec = MemorySpec(kind="linear", chunk_size=4, path="kernel")
    params = init_memory_params(spec, jax.random.PRNGKey(1), H, D, D)
    monkeypatch.setattr(jax, "default_backend", lambda: "METAL")
    with pytest.raises(ConfigError, match=r"path='kernel' .* not on METAL; use path='chunked'"):
        apply_memory(spec, params, *random_inputs(0, B, 8, H, D, D))
    with pytest.raises(ValueError, match=r"body='cuda'; use 'auto' or one of"):
        linear_memory.chunk_recurrence(*_recurrence_inputs(0), coef=1.0, momentum=True,
                                       interpret=True, body="cuda")


@pytest.mark.parametrize("momentum", [True, False])
def test_kernel_path_lowers_to_triton_for_cuda(momentum):
    """Lowering for a CUDA GPU (from this CPU host) picks the Triton body, forward
    and forward+backward, and the Triton lowering accepts every op of the body:
    what fails here would fail on a GPU before compiling."""
    spec = MemorySpec(kind="linear", chunk_size=16, dgd=True, grad_clip=1.0, path="kernel",
                      momentum=momentum)
    d = 16                                       # Triton blocks: powers of two >= 16
    params = init_memory_params(spec, jax.random.PRNGKey(1), H, d, d)
    inputs = random_inputs(0, B, 40, H, d, d)

    def loss(params, *x):
        y, state = apply_memory(spec, params, *x)
        return jnp.sum(y * y) + jnp.sum(state.params["w0"])

    for fn in (loss, jax.grad(loss, argnums=(0, 1, 2))):
        text = jax.jit(fn).trace(params, *inputs).lower(lowering_platforms=("cuda",)).as_text()
        # the forward kernel; with the gradient also the backward kernel
        assert text.count("__gpu$xla.gpu.triton") == (1 if fn is loss else 2)
        assert "tpu_custom_call" not in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 2, 4, 64, 64, 64), (5, 2, 3, 32, 16, 64)])
def test_compiled_triton_kernel_equals_reference_on_gpu(shape):
    """On a GPU: the compiled Triton kernel (auto body) == the XLA reference, values
    and gradients, at the benchmark's shape and at a padded one (fp32 dots on
    both sides; the tolerance covers their different summation orders)."""
    n, b, h, c, d_k, d_v = shape
    *chunks, mt0, st0 = _recurrence_inputs(5, n=n, b=b, h=h, c=c, d_k=d_k, d_v=d_v)
    chunks[3] = chunks[3] * 0.2                      # gates: a stable recurrence over 32
    args = (*chunks, mt0, st0)
    kw = dict(coef=1.5, momentum=True, grad_clip=2.0)

    def kernel(*a):
        return linear_memory.chunk_recurrence(*a, **kw)

    def reference(*a):
        y, final = linear_memory.reference(*a[:5], a[5:], **kw)
        return (y, *final)

    assert "triton" in jax.jit(kernel).lower(*args).as_text()
    for a, r in zip(jax.jit(kernel)(*args), jax.jit(reference)(*args), strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()))

    def loss(fn):
        return lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))

    argnums = tuple(range(len(args)))
    grads = jax.jit(jax.grad(loss(kernel), argnums))(*args)
    grads_ref = jax.jit(jax.grad(loss(reference), argnums))(*args)
    for i, (a, r) in enumerate(zip(grads, grads_ref, strict=True)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4 * float(np.abs(r).max()),
                                   err_msg=f"grad {i}")


@pytest.mark.parametrize("c,d,n,save_every,body", [
    (16, 64, 3, 2, "mosaic"),     # head dim 64, the last segment partial
    (128, 128, 2, 1, "mosaic"),   # head dim 128, the largest chunk
    (32, 64, 3, 3, "triton"),
])
def test_kernels_at_production_head_dims_and_chunks(c, d, n, save_every, body):
    """The chunk-scan kernels (interpret mode) at the head dims and chunk sizes that
    production configs use: values and every gradient == the jnp reference
    within 1e-5 norm-relative (fp32)."""
    *chunks, mt0, st0 = _recurrence_inputs(3, n=n, b=1, h=2, c=c, d_k=d, d_v=d)
    chunks[3] = chunks[3] * (4.0 / c)                 # a stable recurrence at this C
    args = (*chunks, mt0, st0)
    kw = dict(coef=1.5, momentum=True, grad_clip=2.0)

    def kernel(*a):
        return linear_memory.chunk_recurrence(*a, interpret=True, body=body,
                                              save_every=save_every, **kw)

    def reference(*a):
        y, final = linear_memory.reference(*a[:5], a[5:], **kw)
        return (y, *final)

    def loss(fn):
        return lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fn(*a))

    for a, r in zip(kernel(*args), reference(*args), strict=True):
        assert np.linalg.norm(a - r) <= 1e-5 * np.linalg.norm(r)
    argnums = tuple(range(len(args)))
    grads = jax.grad(loss(kernel), argnums)(*args)
    grads_ref = jax.grad(loss(reference), argnums)(*args)
    for i, (a, r) in enumerate(zip(grads, grads_ref, strict=True)):
        assert np.linalg.norm(a - r) <= 1e-5 * np.linalg.norm(r), f"grad {i}"
