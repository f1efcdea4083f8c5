"""The task-loss teach signal (nl_jax/train/teach.py) against a per-sequence,
per-segment Python loop, its causality, lr = 0, and its config errors."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nl_jax import config as config_lib
from nl_jax.errors import ConfigError
from nl_jax.levels import param_paths
from nl_jax.memory.cms import bounded_update
from nl_jax.train import teach
from nl_jax.train.state import ModelDef, build_model
from nl_jax.train.step import cross_entropy, forward_loss

SEQ, SEG, BATCH = 12, 4, 4      # 4 rows: one per data x fsdp shard in the sharded test
# Titans MAG (the teach machinery is model-independent; its second-order compile is
# ~4x cheaper than Hope's): layer 0's SwiGLU is the fast weights, layer 1 above it.
FAST = "blocks/0/mlp/.*"
TITANS = ["--config", "experiments/titans/tiny.py", "--config.model.d_model=16",
          "--config.model.n_heads=2", "--config.model.d_ff=24",
          "--config.model.memory.chunk_size=4", "--config.model.memory.window=4",
          "--config.model.memory.segment_len=4",
          "--config.model.memory.path=oracle"]        # the cheapest second-order compile
HOPE = ["--config.model.d_model=16", "--config.model.n_heads=2", "--config.model.d_ff=24",
        "--config.model.self_modifying.chunk_size=4",
        "--config.model.self_modifying.memory_chunk_size=2",
        "--config.model.cms.periods=(4, 'never')"]


def setup(*flags, model=TITANS, params=FAST, lr=0.5, max_update=0.0):
    config, _ = config_lib.load(model + [f"--config.data.seq_len={SEQ}",
                                         f"--config.teach_signal.segment={SEG}",
                                         f"--config.teach_signal.params={params}",
                                         f"--config.teach_signal.lr={lr}",
                                         f"--config.teach_signal.max_update={max_update}",
                                         *flags])
    graphdef, weights, rest = nnx.split(build_model(config.model, 0), nnx.Param, ...)
    return config, ModelDef(graphdef, rest), weights


def batch(seed=0, vocab=2048):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (BATCH, SEQ + 1)))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def mean_and_rows(segment_losses):
    """``(mean, rows)`` of a segment-losses function, for ``value_and_grad(has_aux=True)``
    (calling it once: tracing it twice doubles the compile)."""
    def fn(*args):
        rows = segment_losses(*args)
        return jnp.mean(rows), rows
    return fn


@functools.cache
def jitted_segment_losses(lr, max_update):
    """The jitted forward ``segment_losses`` of Titans at ``lr``, ``max_update``, one
    per setting and test module: each costs a compile of ~10 s of CPU."""
    config, model_def, weights = setup(lr=lr, max_update=max_update)
    return jax.jit(teach.make_segment_losses(model_def, config, weights))


@pytest.fixture(scope="module")
def taught():
    """Titans at lr = 2 with the trust ratio cutting the steps: the batch, the segment
    losses and their outer gradients (one second-order compile, shared by the tests)."""
    config, model_def, weights = setup(lr=2.0, max_update=0.01)
    data = batch()
    segment_losses = teach.make_segment_losses(model_def, config, weights)
    (_, rows), grads = jax.jit(jax.value_and_grad(
        mean_and_rows(lambda w: segment_losses(w, data)), has_aux=True))(weights)
    return config, model_def, weights, data, segment_losses, rows, grads


def loop_segment_losses(config, model_def, weights, inputs, targets):
    """The definition for one sequence (``[T]`` tokens), one segment at a time:
    plain SGD on the selected weights (trust ratio min(1, mu |w| / |lr g|) per
    matrix).  Returns the ``[T / P]`` segment losses."""
    lr, mu = config.teach_signal.lr, config.teach_signal.max_update
    leaves, treedef = jax.tree.flatten(weights)
    paths = param_paths(weights)
    fast = [i for i, p in enumerate(paths) if re.fullmatch(FAST, p)]
    assert len(paths) == len(leaves) and len(fast) == 3      # gate, up, down

    def sgd(w, g):
        step = lr * g
        if mu > 0:
            step = step * jnp.minimum(1.0, mu * jnp.linalg.norm(w) / jnp.linalg.norm(step))
        return w - step

    current, stream, losses = list(leaves), None, []
    for i in range(SEQ // SEG):
        cut = slice(i * SEG, (i + 1) * SEG)

        def loss(ws, stream=stream, cut=cut, current=current):
            merged = list(current)
            for j, w in zip(fast, ws, strict=True):
                merged[j] = w
            logits, new_stream = model_def.bind(treedef.unflatten(merged))(
                inputs[None, cut], stream)
            total, count = cross_entropy(logits, targets[None, cut])
            return total / count, new_stream

        (value, stream), grads = jax.value_and_grad(loss, has_aux=True)(
            [current[j] for j in fast])
        losses.append(value)
        for j, g in zip(fast, grads, strict=True):
            current[j] = sgd(current[j], g)
    return jnp.stack(losses)


def test_teach_signal_equals_the_per_sequence_segment_loop(taught):
    """Values and the outer (second-order) gradients w.r.t. every weight, with the
    trust ratio cutting the inner steps (the cut changes the losses); the loop
    runs each sequence alone.  lr = 0 gives the plain loss."""
    config, model_def, weights, data, _, got, grads = taught

    one_sequence = jax.jit(jax.value_and_grad(mean_and_rows(
        lambda w, x, y: loop_segment_losses(config, model_def, w, x, y)), has_aux=True))
    rows, grads_loop = [], None
    for b in range(BATCH):           # the batch mean's gradient: the mean of the rows'
        (_, row), g = one_sequence(weights, data["inputs"][b], data["targets"][b])
        rows.append(row)
        grads_loop = g if grads_loop is None else jax.tree.map(jnp.add, grads_loop, g)
    grads_loop = jax.tree.map(lambda g: g / BATCH, grads_loop)
    assert got.shape == (BATCH, SEQ // SEG)
    np.testing.assert_allclose(got, jnp.stack(rows), rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_loop))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_loop), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)

    frozen = jitted_segment_losses(0.0, 0.0)(weights, data)
    uncut = jitted_segment_losses(2.0, 0.0)(weights, data)
    for other in (uncut, frozen):   # the steps are taken; the ratio cuts them
        np.testing.assert_array_equal(other[:, 0], got[:, 0])
        assert not np.allclose(other[:, 1:], got[:, 1:], rtol=1e-5, atol=0)
    np.testing.assert_allclose(jnp.mean(frozen), jax.jit(forward_loss(model_def))(
        weights, data), rtol=1e-6)


def test_segment_losses_are_causal():
    """Segment i's loss reads no token past its last label: changing the tokens
    after the first label of segment 2 leaves segments 0 and 1 bit for bit; the
    last label of segment 1 (the first input of segment 2) changes segment 1 and,
    through the adapted weights, segment 2.  (lr = 2 without the trust ratio: the
    setting, and so the compile, of the uncut losses of the oracle test.)"""
    _, _, weights = setup()
    fn = jitted_segment_losses(2.0, 0.0)
    data = batch(2)
    base = np.asarray(fn(weights, data))
    tokens = jnp.concatenate([data["inputs"], data["targets"][:, -1:]], axis=1)

    def with_tokens(t):
        return {"inputs": t[:, :-1], "targets": t[:, 1:]}

    later = tokens.at[:, 2 * SEG + 1:].set((tokens[:, 2 * SEG + 1:] + 7) % 2048)
    out = np.asarray(fn(weights, with_tokens(later)))
    np.testing.assert_array_equal(out[:, :2], base[:, :2])
    assert (out[:, 2] != base[:, 2]).all()
    label = tokens.at[:, 2 * SEG].set((tokens[:, 2 * SEG] + 7) % 2048)
    out = np.asarray(fn(weights, with_tokens(label)))
    np.testing.assert_array_equal(out[:, 0], base[:, 0])
    assert (out[:, 1] != base[:, 1]).all() and (out[:, 2] != base[:, 2]).all()


def test_sharded_teach_signal_shards_the_batch_and_equals_one_device(taught):
    """Under the trainer's rules on 8 CPU devices (batch over data x fsdp, heads and
    MLP over tensor) the per-sequence vmap shards the batch over data x fsdp
    (``spmd_axis_name``; the per-sequence code sees the rules without those axes),
    and the segment losses equal the one-device run.  (Gradients: the train step
    differentiates the same function; the oracle test above checks them.)  The
    one-device losses: those of the oracle test, checked there against the loop."""
    from experiments import base
    from nl_jax.sharding import use_rules
    from nl_jax.train.mesh import make_mesh

    _, _, weights, data, losses, one, _ = taught     # lr = 2, trust ratio 0.01, 4 rows
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    data = jax.device_put(data, rows)
    weights = jax.device_put(weights, NamedSharding(mesh, P()))
    with use_rules(mesh, base.get_config().sharding.rules):
        sharded = jax.jit(losses)
        hlo = sharded.lower(weights, data).as_text()
        out = sharded(weights, data)
    assert "mhlo.num_partitions = 8" in hlo
    # inside, activations [4 sequences, a batch of 1, ...]: the vmap's spmd_axis_name
    # puts the sequences on data x fsdp, the rules leave the batch of one whole
    inner = re.findall(r'sharding_constraint .*<@mesh, \[(\{[^}]*\}), (\{[^}]*\}).*tensor<4x1x',
                       hlo)
    assert inner and all(dims == ('{"data", "fsdp"}', "{}") for dims in inner), inner[:3]
    assert out.sharding.is_equivalent_to(rows, out.ndim)   # one row per data x fsdp shard
    np.testing.assert_allclose(out, one, rtol=1e-6)


@pytest.mark.parametrize("flags, needle", [
    (["--config.teach_signal.segment=5"], "teach_signal.segment must divide"),
    ([f"--config.teach_signal.segment={SEQ}"], "at least two segments"),
    (["--config.teach_signal.lr=-1.0"], "teach_signal.lr must be a number >= 0"),
    (["--config.model.mixer=attention", "--config.model.mlp=swiglu"], "streams exactly"),
    (["--config.model.memory.chunk_size=3"],
     r"segment=4 must be a multiple of model.memory.chunk_size=3"),
    (["--config.model.memory.path=kernel"], "no second derivative"),
])
def test_bad_teach_signal_settings_name_the_key(flags, needle):
    config, model_def, weights = setup(*flags)
    with pytest.raises(ConfigError, match=needle):
        teach.make_teach_loss(model_def, config, weights)


@pytest.mark.parametrize("params, needle", [
    ("blocks/9/.*", "matches no parameter"),
    ("blocks/0/mlp/levels/0/.*", "updated in context"),    # Hope's in-context CMS level
    ("blocks/0/mixer/.*", "initial states of in-context memories"),
    ("blocks/(", "is not a regex"),
])
def test_bad_teach_signal_selections_are_refused(params, needle):
    config, model_def, weights = setup(model=HOPE, params=params)
    with pytest.raises(ConfigError, match=needle):
        teach.make_teach_loss(model_def, config, weights)


def test_bounded_update_has_finite_derivatives_of_every_order_at_zero():
    """The trust ratio of the CMS step (reused by the teach signal) is differentiated
    twice by the teach signal's outer gradient; at a zero step or zero weights a
    plain sqrt / division gives inf * 0 = NaN there (seen: every Hope gradient NaN
    with the fast weights below an in-context level)."""
    def f(w, a):
        return jnp.sum(bounded_update({"w": w}, {"w": a}, 0.01)["w"] ** 2)

    hessian = jax.jit(jax.hessian(f, argnums=(0, 1)))   # one compile for the three points
    w = jnp.arange(1.0, 7.0).reshape(1, 2, 3) / 10
    for point in ((w, jnp.zeros_like(w)), (jnp.zeros_like(w), w), (w, w)):
        for h in hessian(*point):
            for block in h:
                assert np.isfinite(np.asarray(block)).all()
    # the value: |a| = 9.1|w| > 0.01|w|, so the step is cut to 0.01 |w|
    out = bounded_update({"w": w}, {"w": w}, 0.01)["w"]
    np.testing.assert_allclose(out, 0.99 * w, rtol=1e-6)
