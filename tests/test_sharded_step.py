"""One train step on an 8-device (fsdp x tensor) mesh == the single-device step."""

import jax
import numpy as np
import optax

from experiments import base
from nl_jax.train.mesh import batch_sharding, make_mesh, replicated
from nl_jax.train.state import init_train_state
from nl_jax.train.step import make_train_step


def _config(fsdp, tensor):
    c = base.get_config()
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


def test_fsdp_tensor_mesh_step_equals_single_device():
    assert len(jax.devices()) == 8, "conftest must provide 8 CPU devices"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    single, m1, _ = _run_step(_config(1, 1), jax.devices()[:1], batch)
    sharded, m8, shardings = _run_step(_config(4, 2), jax.devices(), batch)

    # The mesh really shards: some parameter is split over fsdp and tensor.
    specs = {tuple(s.spec) for s in jax.tree.leaves(shardings["params"])}
    assert ("fsdp", "tensor") in specs or ("tensor", "fsdp") in specs
    leaf = jax.tree.leaves(sharded["params"])[0]
    assert len(leaf.sharding.device_set) > 1

    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=0, atol=1e-5)
    assert float(m1["grad_norm"]) > 1e-3  # the step really moves the parameters
    for key in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(single[key]), jax.tree.leaves(sharded[key]), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
