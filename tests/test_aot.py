"""Pre-flight compile: against a real TPU topology (needs the tpu extra: libtpu)
and against this machine's own devices (``--topology local``)."""

import importlib.util

import pytest
from jax.sharding import PartitionSpec as P

from experiments import base

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def test_preflight_on_local_cpu_mesh_reports_memory_without_allocating():
    from nl_jax.train.aot import preflight
    c = base.get_config()
    c.mesh = dict(data=2, fsdp=2, tensor=2)
    report = preflight(c, "local")
    assert report["chips"] == 8 and report["device_kind"] == "cpu"
    assert report["tokens_per_step"] == c.data.batch_size * c.data.seq_len
    # params + 2 Adam moments in fp32, sharded: at most 3 * 4 bytes * params per device
    assert 0 < report["argument_gib"] <= 3 * 4 * report["params"] / 2**30
    assert report["temp_gib"] > 0 and report["fits"] is None   # no HBM figure for a CPU


@needs_libtpu
def test_preflight_compiles_for_v5p_slice_and_reports_memory():
    from nl_jax.train.aot import preflight
    c = base.get_config()
    c.mesh = dict(data=2, fsdp=2, tensor=1)
    report = preflight(c, "v5p:2x2x1")
    assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # fp32 params + 2 Adam moments, sharded 4 ways (embed over fsdp, batch over data x fsdp)
    assert 0 < report["argument_gib"] < 3 * 4 * report["params"] / 2**30
    assert report["fits"] is True and report["flops_per_chip"] > 0


@needs_libtpu
def test_memory_kernel_compiles_for_tpu_with_mosaic():
    """The Pallas kernel (forward, and the forward+backward that saves chunk states)
    lowers through Mosaic and is in the compiled TPU program; T = 1000 leaves the
    last chunk partial."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from nl_jax.memory import MemorySpec, apply_memory
    from nl_jax.train.aot import topology_devices

    sharding = NamedSharding(Mesh(topology_devices("v5p:2x2x1")[:1], ("x",)), P())
    b, t, h, d = 2, 1000, 4, 64

    def shaped(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

    args = [{"w0": shaped(h, d, d)}, shaped(b, t, h, d), shaped(b, t, h, d),
            shaped(b, t, h, d), shaped(b, t, h), shaped(b, t, h), shaped(b, t, h)]
    for spec in (MemorySpec(path="kernel", dgd=True), MemorySpec(path="kernel", grad_clip=1.0,
                                                                 momentum=False)):
        forward = jax.jit(lambda *a, spec=spec: apply_memory(spec, *a)[0])
        grads = jax.jit(jax.grad(lambda *a, spec=spec: jnp.sum(apply_memory(spec, *a)[0] ** 2),
                                 argnums=tuple(range(7))))
        for fn in (forward, grads):
            lowered = fn.lower(*args)
            assert "tpu_custom_call" in lowered.as_text()        # Mosaic, not interpret mode
            assert "linear_memory_chunks" in lowered.compile().as_text()


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_memory_kernel_with_head_dim_512_fits_vmem(topology):
    """d_k = d_v = 512 with momentum and saved chunk states needs ~20 MiB of VMEM, past
    Mosaic's 16 MiB default: the kernel raises its scoped-VMEM limit and compiles."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from nl_jax.train.aot import topology_devices
    from nl_jax_kernels import linear_memory as lm

    sharding = NamedSharding(Mesh(topology_devices(topology)[:1], ("x",)), P())
    n, b, h, c, d = 4, 1, 2, 64, 512

    def shaped(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

    assert lm.vmem_limit_bytes(c, d, d, 2, True) > lm.DEFAULT_SCOPED_VMEM
    assert lm.vmem_limit_bytes(c, 256, 256, 2, True) is None
    fn = jax.jit(lambda *a: lm.pallas_recurrence(*a[:5], a[5:], coef=2.0, momentum=True,
                                                 grad_clip=0.0, save_states=True))
    fn.lower(shaped(n, b, h, c, d), shaped(n, b, h, c, d), shaped(n, b, h, c, d),
             shaped(n, b, h, c, c), shaped(n, b, h, len(lm.ROWS), c),
             shaped(b, h, d, d), shaped(b, h, d, d)).compile()


@needs_libtpu
@pytest.mark.parametrize("mesh_shape,batch", [
    ({"data": 2, "fsdp": 1, "tensor": 2}, 4),   # rows over data, heads over tensor
    ({"data": 2, "fsdp": 2, "tensor": 1}, 2),   # rows over data only (fsdp does not divide)
    ({"data": 2, "fsdp": 2, "tensor": 1}, 1),   # nothing divides: replicated, still per shard
])
def test_memory_kernel_runs_per_shard_on_a_tpu_mesh(mesh_shape, batch):
    """Under the trainer's sharding rules on 4 v5p chips the kernel runs inside
    shard_map (Mosaic calls cannot be partitioned by XLA): the compiled forward
    moves no activations between chips, and forward+backward compiles."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from nl_jax.memory import MemorySpec, apply_memory
    from nl_jax.sharding import local_mesh_axes, use_rules
    from nl_jax.train.aot import topology_devices
    from nl_jax.train.mesh import make_mesh

    mesh = make_mesh(mesh_shape, topology_devices("v5p:2x2x1"))
    t, h, d = 512, 4, 64
    rules = base.get_config().sharding.rules
    with use_rules(mesh, rules):
        rows, heads = local_mesh_axes(("batch", "heads"), (batch, h))[1]

    def shaped(*shape, spec=(rows, None, heads)):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P(*spec)))

    args = [{"w0": shaped(h, d, d, spec=(heads,))}, shaped(batch, t, h, d),
            shaped(batch, t, h, d), shaped(batch, t, h, d), shaped(batch, t, h),
            shaped(batch, t, h), shaped(batch, t, h)]
    spec = MemorySpec(path="kernel")
    with use_rules(mesh, rules):
        forward = jax.jit(lambda *a: apply_memory(spec, *a)[0]).lower(*args)
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(apply_memory(spec, *a)[0] ** 2),
                                 argnums=tuple(range(7)))).lower(*args)
    assert "tpu_custom_call" in forward.as_text()
    text = forward.compile().as_text()
    assert "linear_memory_chunks" in text
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in text, collective
    assert "linear_memory_chunks" in grads.compile().as_text()


def test_usable_hbm_is_the_allocator_limit_or_the_nominal_share():
    from types import SimpleNamespace

    from nl_jax.train.aot import usable_hbm_gib

    def device(kind, limit=None):
        return SimpleNamespace(device_kind=kind,
                               memory_stats=lambda: {"bytes_limit": limit} if limit else None)

    assert usable_hbm_gib(device("NVIDIA H100 80GB HBM3"), local=False) == 60.0   # 75%
    assert usable_hbm_gib(device("NVIDIA H100 80GB HBM3", 50 * 2**30), local=True) == 50.0
    assert usable_hbm_gib(device("TPU v5p"), local=False) == 95
    assert usable_hbm_gib(device("cpu"), local=True) is None


def test_preflight_compiles_exactly_the_step_training_runs(tmp_path):
    """The trainer and the pre-flight build their step with one builder
    (``aot.train_program``): lowered for the same batch on the same sharded
    mesh, their StableHLO is identical."""
    import hashlib

    import jax

    from nl_jax import config as config_lib
    from nl_jax import configs
    from nl_jax.train import aot
    from nl_jax.train.loop import Trainer
    config = config_lib.load_config_file(configs.path("transformer/tiny.py"))
    config.mesh = dict(data=2, fsdp=2, tensor=2)
    config.data.seq_len, config.data.batch_size = 32, 8
    config.data.cache_dir = str(tmp_path / "cache")
    config.model.d_model, config.model.n_layers, config.model.d_ff = 32, 1, 64
    devices = jax.devices()[:8]
    trainer = Trainer(config, str(tmp_path / "run"), devices=devices, write_metrics=False)
    program = aot.train_program(config, devices)
    batch = aot.abstract_batch(config, program)

    def fingerprint(step, state):
        return hashlib.sha256(step.lower(state, batch).as_text().encode()).hexdigest()

    assert (fingerprint(trainer.train_step, trainer.abstract_state)
            == fingerprint(program.step, program.abstract_state))
