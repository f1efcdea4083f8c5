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
            assert "chunk_scan_forward" in lowered.compile().as_text()


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_memory_kernel_with_head_dim_512_fits_vmem(topology):
    """d_k = d_v = 512 with momentum needs more than Mosaic's 16 MiB default of VMEM
    (forward and backward kernels): the kernels raise their scoped-VMEM limit
    and compile; head dim 256 fits the default."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from nl_jax.train.aot import topology_devices
    from nl_jax_kernels import chunk_scan
    from nl_jax_kernels import linear_memory as lm

    sharding = NamedSharding(Mesh(topology_devices(topology)[:1], ("x",)), P())
    n, b, h, c, d = 4, 1, 2, 64, 512

    def shaped(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)

    def args(d):
        return (shaped(n, b, h, c, d), shaped(n, b, h, c, d), shaped(n, b, h, c, d),
                shaped(n, b, h, c, c), shaped(n, b, h, len(lm.ROWS), c),
                shaped(b, h, d, d), shaped(b, h, d, d))

    def plan(d):
        a = args(d)
        step = functools.partial(lm._step, coef=2.0, momentum=True, grad_clip=0.0)
        rows = jax.eval_shape(lambda r: lm._named_rows(r, True, 0.0), a[4])
        return chunk_scan._Plan(step, a[5:], (*a[:4], *rows), 2)

    for backward in (False, True):
        assert plan(d).vmem_limit(backward) > chunk_scan.DEFAULT_SCOPED_VMEM
        assert plan(256).vmem_limit(backward) is None

    def loss(*a):
        y, mt, st = lm.chunk_recurrence(*a, coef=2.0, momentum=True, save_every=2)
        return jnp.sum(y) + jnp.sum(mt) + jnp.sum(st)

    jax.jit(jax.grad(loss, argnums=tuple(range(7)))).lower(*args(d)).compile()


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
    assert "chunk_scan_forward" in text
    for collective in ("all-gather", "all-to-all", "all-reduce", "collective-permute"):
        assert collective not in text, collective
    assert "chunk_scan_forward" in grads.compile().as_text()


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


def test_preflight_estimates_step_time_and_mfu_on_local_cpu(tmp_path, capsys):
    """``aot --topology local --json``: the analytic FLOPs of flops.py against this
    host's measured peak (the CPU has no HBM bandwidth figure: compute-bound by
    construction), XLA's bytes accessed, the collectives of the 2x2x2 mesh."""
    import json

    from nl_jax import config as config_lib
    from nl_jax.models import flops
    from nl_jax.train import aot
    argv = ["--config", "experiments/transformer/tiny.py", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.data.seq_len=32",
            "--config.data.batch_size=8", "--config.model.d_model=32",
            "--config.model.n_layers=1", "--config.model.d_ff=64"]
    out = tmp_path / "aot.json"
    assert aot.main([*argv, "--topology", "local", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    config, _ = config_lib.load(argv)
    assert report["model_flops_per_token"] == flops.model_flops_per_token(config)
    assert report["model_flops_per_step"] == report["model_flops_per_token"] * 8 * 32
    assert report["peak_flops"] == report["peak_flops_per_chip"] > 0   # one host, 8 devices
    assert report["compute_s"] == pytest.approx(report["model_flops_per_step"]
                                                / report["peak_flops"])
    assert report["bytes_accessed_per_chip"] > 0 and report["memory_s"] is None
    assert report["est_step_s"] == report["compute_s"] and report["est_mfu"] == pytest.approx(1)
    assert report["bound"] == "compute (no HBM bandwidth known for cpu)"
    assert report["collective_bytes_per_chip"] > 0 and "all-reduce x" in report["collectives"]
    assert "est_step_s" in printed and "estimated step:" in printed


def test_roofline_estimate_uses_the_chip_table_and_async_collectives():
    """The estimate on 4 v5p chips (bf16): compute time = model FLOPs / (4 x 459
    TFLOP/s), memory time = bytes accessed / 2765 GB/s, the step the longer; the
    collectives' bytes are what each returns (an async start: its outputs)."""
    from types import SimpleNamespace

    from nl_jax.models import flops
    from nl_jax.train import aot
    c = base.get_config()
    c.model.dtype = "bfloat16"
    devices = [SimpleNamespace(device_kind="TPU v5", platform="tpu", process_index=0)] * 4
    hlo = "\n".join([
        "  %all-reduce.1 = f32[128,64]{1,0} all-reduce(%p), channel_id=1, to_apply=%add",
        "  %ags = (bf16[8,16]{1,0}, bf16[32,16]{1,0}) all-gather-start(%q), dimensions={0}",
        "  %agd = bf16[32,16]{1,0} all-gather-done(%ags)",
        "  %cps = (f32[4]{0}, f32[4]{0}, u32[], u32[]) collective-permute-start(%r)",
        "  ROOT %rs = bf16[2,8]{1,0} reduce-scatter(%s), dimensions={0}, to_apply=%add",
        "  %fusion = f32[4]{0} fusion(%all-reduce.1), kind=kLoop, calls=%all-gather.2",
    ])
    step_flops = flops.model_flops_per_token(c) * c.data.batch_size * c.data.seq_len
    for accessed, bound in ((1e3, "compute"), (1e13, "memory")):
        est = aot.estimate(c, devices, {"bytes accessed": accessed}, hlo)
        compute_s, memory_s = step_flops / (4 * 459e12), accessed / 2765e9
        assert est["compute_s"] == pytest.approx(compute_s)
        assert est["memory_s"] == pytest.approx(memory_s)
        assert est["est_step_s"] == pytest.approx(max(compute_s, memory_s))
        assert est["bound"] == bound
        assert est["est_mfu"] == pytest.approx(compute_s / max(compute_s, memory_s))
    assert est["collective_bytes_per_chip"] == 128 * 64 * 4 + 32 * 16 * 2 + 4 * 4 + 2 * 8 * 2
    assert est["collectives"] == ("all-gather x1, all-reduce x1, collective-permute x1, "
                                  "reduce-scatter x1")
    unknown = [SimpleNamespace(device_kind="TPU v4 lite", platform="tpu", process_index=0)]
    est = aot.estimate(c, unknown, {"bytes accessed": 1e3}, None)
    assert est["est_step_s"] is None and "no peak FLOP/s is known" in est["peak_source"]
    assert est["collective_bytes_per_chip"] is None and "unknown" in est["collectives"]


@needs_libtpu
def test_preflight_estimates_mfu_for_a_v5p_slice():
    from nl_jax.train.aot import preflight
    c = base.get_config()
    c.mesh = dict(data=2, fsdp=2, tensor=1)
    c.model.dtype = "bfloat16"
    report = preflight(c, "v5p:2x2x1")
    assert report["peak_flops_per_chip"] == pytest.approx(459e12)
    assert report["hbm_bytes_per_s"] == pytest.approx(2765e9)
    assert report["bytes_accessed_per_chip"] > 0 and report["memory_s"] > 0
    assert report["est_step_s"] == pytest.approx(max(report["compute_s"], report["memory_s"]))
    assert 0 < report["est_mfu"] <= 1 and report["collective_bytes_per_chip"] > 0


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_hope_and_titans_mlp_kernels_compile_for_tpu(topology):
    """One Hope self-modifying layer and one Titans MLP memory with path='kernel':
    forward and backward chunk-scan kernels lower through Mosaic (not interpret
    mode) and are in the compiled TPU program, at head dim 64 (Hope) and 128
    (Titans MLP, hidden 256); T = 1000 leaves the last chunks partial."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from nl_jax.memory import MemorySpec, apply_memory, init_memory_params
    from nl_jax.models.self_modifying import SelfModifyingTitans
    from nl_jax.train.aot import topology_devices

    sharding = NamedSharding(Mesh(topology_devices(topology)[:1], ("x",)), P())

    def shaped(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            tree)

    def check(fn, *args):
        lowered = jax.jit(fn).lower(*args)
        assert "tpu_custom_call" in lowered.as_text()
        text = lowered.compile().as_text()
        assert "chunk_scan_forward" in text and "chunk_scan_backward" in text

    cfg = ml_collections.ConfigDict(dict(
        d_model=256, n_heads=4, dtype="float32",
        self_modifying=dict(path="kernel", memory="mlp", chunk_size=16, memory_chunk_size=64)))
    gdef, params = nnx.split(nnx.eval_shape(lambda: SelfModifyingTitans(cfg, rngs=nnx.Rngs(0))))

    def hope_loss(p, x):
        return jnp.sum(nnx.merge(gdef, p)(x)[0] ** 2)

    check(jax.grad(hope_loss, argnums=(0, 1)), shaped(params),
          shaped(jax.ShapeDtypeStruct((2, 1000, 256), jnp.float32)))

    spec = MemorySpec(kind="mlp", path="kernel", dgd=True, grad_clip=1.0, chunk_size=64)
    b, t, h, d = 2, 1000, 4, 128
    memory = shaped(jax.eval_shape(lambda: init_memory_params(spec, jax.random.PRNGKey(0),
                                                              h, d, d)))
    seq = [shaped(jax.ShapeDtypeStruct((b, t, h) + tail, jnp.float32))
           for tail in ((d,), (d,), (d,), (), (), ())]
    check(jax.grad(lambda *a: jnp.sum(apply_memory(spec, *a)[0] ** 2), argnums=(0, 1, 2, 3)),
          memory, *seq)


@needs_libtpu
def test_preflight_of_a_tpu_topology_compiles_the_kernels_of_auto_paths():
    """The shipped Hope tiny config (path='auto' on every token-clock level) built for
    a v5p topology from this CPU host: the train step holds the chunk-scan kernels
    (forward and backward), while on the CPU the same config builds the XLA path."""
    from nl_jax import config as config_lib
    from nl_jax.train.aot import abstract_batch, topology_devices, train_program

    config, _ = config_lib.load([])
    assert config.model.self_modifying.path == "auto"
    program = train_program(config, topology_devices("v5p:2x2x1"))
    text = program.step.lower(program.abstract_state,
                              abstract_batch(config, program)).compile().as_text()
    assert "chunk_scan_forward" in text and "chunk_scan_backward" in text
