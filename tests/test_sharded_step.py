"""One train step on an 8-device (fsdp x tensor) mesh == the single-device step."""

import jax
import numpy as np
import optax
import pytest

from experiments import base
from nl_jax.levels import param_paths
from nl_jax.train.mesh import batch_sharding, make_mesh, replicated
from nl_jax.train.state import init_train_state
from nl_jax.train.step import make_train_step


def _config(fsdp, tensor, family="transformer"):
    c = base.get_config()
    if family == "titans":       # deep (MLP) memory: M_0 is w1 and w2, sharded over fsdp
        from experiments.titans import tiny
        c = tiny.get_config()
        c.model.memory.update(kind="mlp", chunk_size=4, window=8)
    elif family == "hope":
        from experiments.hope import tiny
        c = tiny.get_config()
        c.model.self_modifying.update(chunk_size=8, memory_chunk_size=4)
        c.model.cms.periods = (8, "never")
    if family != "transformer":
        c.model.n_layers = 1         # one block of each layer type: half the compile
    c.model.vocab_size = 64
    c.model.d_model = 32
    c.model.n_heads = 4
    c.model.d_ff = 64
    c.mesh = dict(data=1, fsdp=fsdp, tensor=tensor)
    return c


def _run_step(c, devices, batch):
    mesh = make_mesh(c.mesh, devices)
    rules = tuple(tuple(r) for r in c.sharding.rules)
    # SGD with momentum: params and optimizer state are linear in the gradient,
    # so 1e-5 agreement checks the sharded gradients themselves (Adam's first
    # step, g / (|g| + eps), amplifies reduction-order noise of tiny gradients).
    opt = optax.sgd(0.5, momentum=0.9)
    model_def, state, shardings = init_train_state(c.model, opt, 0, mesh, rules)
    step = jax.jit(make_train_step(model_def, opt, mesh, rules),
                   in_shardings=(shardings, batch_sharding(mesh, rules)),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    new_state, metrics = step(state, batch)
    return new_state, metrics, shardings


@pytest.mark.parametrize("family", ["transformer", "titans", "hope"])
def test_fsdp_tensor_mesh_step_equals_single_device(family):
    assert len(jax.devices()) == 8, "conftest must provide 8 CPU devices"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    single, m1, _ = _run_step(_config(1, 1, family), jax.devices()[:1], batch)
    sharded, m8, shardings = _run_step(_config(4, 2, family), jax.devices(), batch)

    # The mesh really shards: some parameter is split over fsdp and tensor, and
    # a memory's initial state M_0 is split over heads (tensor) and fsdp.
    specs = {tuple(s.spec) for s in jax.tree.leaves(shardings["params"])}
    assert ("fsdp", "tensor") in specs or ("tensor", "fsdp") in specs
    if family != "transformer":
        memory_specs = {path: tuple(s.spec) for path, s in zip(
            param_paths(shardings["params"]), jax.tree.leaves(shardings["params"]),
            strict=True) if "/memories/" in path or "/init_params/" in path}
        assert memory_specs and all(spec[0] == "tensor" and spec[-1] == "fsdp"
                                    for spec in memory_specs.values()), memory_specs
    leaf = jax.tree.leaves(sharded["params"])[0]
    assert len(leaf.sharding.device_set) > 1

    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=0, atol=1e-5)
    assert float(m1["grad_norm"]) > 1e-3  # the step really moves the parameters
    for key in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(single[key]), jax.tree.leaves(sharded[key]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


def _rules():
    return tuple(tuple(r) for r in base.get_config().sharding.rules)


def test_process_rows_accept_a_batch_split_across_processes():
    """8 devices as 2 "processes" of 4: with the batch split 2 ways along the
    process boundary, process p's devices hold exactly rows p*B/2 : (p+1)*B/2."""
    from nl_jax.train.mesh import check_process_rows
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices())
    sharding = batch_sharding(mesh, _rules())
    for p in range(2):
        check_process_rows(sharding, 8, 16, list(mesh.devices[p].flat), p, 2)


def test_process_rows_with_a_sequence_sharded_batch():
    """Rules that also split the length axis (sequence parallelism) are checked on
    the batch rows alone."""
    from nl_jax.train.mesh import check_process_rows
    mesh = make_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices())
    sharding = batch_sharding(mesh, (("batch", "data"), ("length", "tensor")))
    for p in range(2):
        check_process_rows(sharding, 8, 16, list(mesh.devices[p].flat), p, 2)


def test_process_rows_refuse_tensor_parallelism_across_processes():
    """Batch replicated over a tensor axis that spans both "processes": each would
    feed different rows to copies that must be equal; a ConfigError names the fix."""
    import pytest

    from nl_jax.errors import ConfigError
    from nl_jax.train.mesh import check_process_rows
    mesh = make_mesh(dict(data=1, fsdp=1, tensor=8), jax.devices())
    sharding = batch_sharding(mesh, _rules())
    with pytest.raises(ConfigError, match=r"holds? batch rows 0:8, but its data is rows 0:4"):
        check_process_rows(sharding, 8, 16, list(mesh.devices.flat)[:4], 0, 2)


def test_frozen_levels_get_no_gradient_and_stay_put():
    """A train step with a frozen level: its parameters do not move, and the
    logged grad_norm is that of the trainable levels only."""
    from nl_jax import levels as levels_lib
    from nl_jax.levels import param_paths
    c = _config(1, 1)
    levels = dict(norms=dict(params=".*norm.*", every="never"),
                  rest=dict(params="(?!.*norm).*", every=1,
                            optimizer=dict(name="sgd", learning_rate=0.5)))
    mesh = make_mesh(c.mesh, jax.devices()[:1])
    rules = tuple(tuple(r) for r in c.sharding.rules)
    from nl_jax.train.state import abstract_model
    _, abstract = abstract_model(c.model, 0)
    opt = levels_lib.build_levels(levels, abstract, total_steps=4)
    model_def, state, _ = init_train_state(c.model, opt, 0, mesh, rules)
    mask = levels_lib.frozen_mask(levels, abstract)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, size=(4, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    before = jax.tree.map(np.asarray, state["params"])
    free = jax.jit(make_train_step(model_def, opt, mesh, rules))(state, batch)[1]
    new, metrics = jax.jit(make_train_step(model_def, opt, mesh, rules, frozen=mask))(
        state, batch)
    paths = param_paths(before)
    frozen = [p for p in paths if "norm" in p]
    assert frozen and len(frozen) < len(paths)
    moved = {p for p, a, b in zip(paths, jax.tree.leaves(before),
                                  jax.tree.leaves(new["params"]), strict=True)
             if not np.array_equal(a, np.asarray(b))}
    assert moved == set(paths) - set(frozen)
    assert 1e-3 < float(metrics["grad_norm"]) < float(free["grad_norm"])


def test_a_dimension_the_mesh_cannot_split_is_a_config_error():
    import pytest

    from nl_jax.errors import ConfigError
    from nl_jax.train.mesh import param_shardings
    from nl_jax.train.state import abstract_model
    c = _config(1, 8)
    c.model.d_model, c.model.d_ff = 36, 64       # 36 columns over tensor = 8
    _, abstract = abstract_model(c.model, 0)
    with pytest.raises(ConfigError, match=r"parameter blocks/0/mixer/w\w/kernel of shape "
                                          r"\(36, 36\) cannot be sharded.*mesh.tensor"):
        param_shardings(abstract, make_mesh(c.mesh, jax.devices()), _rules())


@pytest.mark.parametrize("d_model, expected", [(64, "fsdp"), (24, None)])
def test_memory_state_is_split_over_fsdp_only_where_it_divides(d_model, expected):
    """M_0's last dimension (head_dim 32 or 12 here) goes over fsdp = 8 only when 8
    divides it; otherwise it stays whole (no config error: pod fsdp sizes exceed
    the per-head dimensions), while every other dimension is still checked."""
    from experiments.titans import tiny
    from nl_jax.train.mesh import param_shardings
    from nl_jax.train.state import abstract_model
    c = tiny.get_config()
    c.model.update(vocab_size=64, d_model=d_model, n_heads=2, d_ff=64)
    _, abstract = abstract_model(c.model, 0)
    mesh = make_mesh(dict(data=1, fsdp=8, tensor=1), jax.devices())
    shardings = param_shardings(abstract, mesh, tuple(tuple(r) for r in c.sharding.rules))
    specs = {path: tuple(s.spec) for path, s in zip(
        param_paths(shardings), jax.tree.leaves(shardings), strict=True)}
    memory = {p: s for p, s in specs.items() if "/init_params/" in p}
    assert memory and all(s[-1] == expected for s in memory.values()), memory
    assert specs["embed"] == ("tensor", "fsdp")   # vocab -> tensor (size 1), embed -> fsdp
