"""Outer levels (nl_jax.levels): partition by path, periods, frozen levels, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.levels import PeriodicState, build_levels, level_metrics, param_paths
from nl_jax.optim import build_optimizer


def tiny_params():
    return {"embed": jnp.ones((4, 2)),
            "blocks": {0: {"mixer": {"wq": {"kernel": jnp.ones((2, 2))}},
                           "norm": {"scale": jnp.ones((2,))}},
                       1: {"mixer": {"wq": {"kernel": jnp.ones((2, 2))}},
                           "norm": {"scale": jnp.ones((2,))}}}}


def sgd(lr=1.0):
    return dict(name="sgd", learning_rate=lr)


def test_paths_of_nested_dicts_and_nnx_state():
    assert "blocks/0/mixer/wq/kernel" in param_paths(tiny_params())

    class Tiny(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0))])
            self.embed = nnx.Param(jnp.zeros((5, 2)))

    _, state = nnx.split(Tiny(), nnx.Param)
    assert sorted(param_paths(state)) == ["blocks/0/bias", "blocks/0/kernel", "embed"]
    tx = build_levels(dict(a=dict(params="blocks/.*", every=1, optimizer=sgd()),
                           b=dict(params="embed", every="never", optimizer=sgd())),
                      state, total_steps=4)
    grads = jax.tree.map(jnp.ones_like, state)
    u, _ = tx.update(grads, tx.init(state), state)
    np.testing.assert_array_equal(u["blocks"][0]["kernel"][...], -np.ones((2, 3)))
    np.testing.assert_array_equal(u["embed"][...], np.zeros((5, 2)))


def test_every_k_equals_optax_multisteps():
    params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.4]]), "b": jnp.array([0.5, -0.5])}
    spec = dict(name="adamw", learning_rate=0.05, weight_decay=0.1)
    ours = build_levels(dict(all=dict(params=".*", every=3, optimizer=spec)), params,
                        total_steps=30)
    reference = optax.MultiSteps(build_optimizer(spec, 10), every_k_schedule=3)
    loss = lambda p: jnp.sum(jnp.sin(p["w"] * 3)) + jnp.sum(p["b"] ** 2)  # noqa: E731
    p1, s1 = params, ours.init(params)
    p2, s2 = params, reference.init(params)
    for _ in range(8):
        u1, s1 = ours.update(jax.grad(loss)(p1), s1, p1)
        p1 = optax.apply_updates(p1, u1)
        u2, s2 = reference.update(jax.grad(loss)(p2), s2, p2)
        p2 = optax.apply_updates(p2, u2)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(p1["w"], params["w"])


def test_each_level_updates_exactly_on_its_steps():
    params = tiny_params()
    levels = dict(
        embed=dict(params="embed", every=1, optimizer=sgd()),
        block0=dict(params="blocks/0/.*", every=2, optimizer=sgd()),
        block1=dict(params="blocks/1/mixer/.*", every=3, optimizer=sgd()),
        norms=dict(params="blocks/1/norm/.*", every="never", optimizer=sgd()))
    tx = build_levels(levels, params, total_steps=6)
    state = tx.init(params)
    step_fn = jax.jit(tx.update)
    grads = jax.tree.map(jnp.ones_like, params)
    for t in range(1, 7):
        u, state = step_fn(grads, state, params)
        np.testing.assert_array_equal(u["embed"], -1.0)
        np.testing.assert_array_equal(u["blocks"][0]["mixer"]["wq"]["kernel"],
                                      -1.0 if t % 2 == 0 else 0.0)
        np.testing.assert_array_equal(u["blocks"][0]["norm"]["scale"],
                                      -1.0 if t % 2 == 0 else 0.0)
        np.testing.assert_array_equal(u["blocks"][1]["mixer"]["wq"]["kernel"],
                                      -1.0 if t % 3 == 0 else 0.0)
        np.testing.assert_array_equal(u["blocks"][1]["norm"]["scale"], 0.0)
        m = jax.jit(level_metrics)(state)
        assert (int(m["updates/embed"]), int(m["updates/block0"]), int(m["updates/block1"]),
                int(m["updates/norms"])) == (t, t // 2, t // 3, 0)
        assert float(m["lr/embed"]) == 1.0 and float(m["lr/norms"]) == 0.0


def test_period_one_has_no_buffer_and_frozen_has_no_state():
    params = tiny_params()
    tx = build_levels(dict(fast=dict(params="embed", every=1, optimizer=sgd()),
                           slow=dict(params="blocks/0/.*", every=2, optimizer=sgd()),
                           frozen=dict(params="blocks/1/.*", every="never",
                                       optimizer=sgd())), params, total_steps=4)
    state = tx.init(params)
    assert jax.tree.leaves(state[0]) == []          # the clip step is stateless
    inner = state[1].inner_states
    is_periodic = lambda s: isinstance(s, PeriodicState)  # noqa: E731
    assert not any(is_periodic(x) for x in jax.tree.leaves(inner["fast"], is_leaf=is_periodic))
    assert any(is_periodic(x) for x in jax.tree.leaves(inner["slow"], is_leaf=is_periodic))
    assert jax.tree.leaves(inner["frozen"]) == []


def test_global_norm_clipping_before_the_levels():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    tx = build_levels(dict(a=dict(params="a", every=1, optimizer=sgd()),
                           b=dict(params="b", every=1, optimizer=sgd(0.5))),
                      params, total_steps=4, grad_clip_norm=1.0)
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}   # norm 5
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["a"], [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(u["b"], [0.0, -0.4], rtol=1e-6)


def test_frozen_gradients_do_not_count_in_clipping():
    """A frozen level's (large) gradient neither enters the norm nor scales the others."""
    params = {"a": jnp.zeros(2), "f": jnp.zeros(2)}
    tx = build_levels(dict(a=dict(params="a", every=1, optimizer=sgd()),
                           f=dict(params="f", every="never")),
                      params, total_steps=4, grad_clip_norm=1.0)
    grads = {"a": jnp.array([0.6, 0.0]), "f": jnp.array([100.0, 0.0])}
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["a"], [-0.6, 0.0], rtol=1e-6)   # under the clip: unchanged
    np.testing.assert_array_equal(u["f"], [0.0, 0.0])
    grads = {"a": jnp.array([3.0, 4.0]), "f": jnp.array([100.0, 0.0])}
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(u["a"], [-0.6, -0.8], rtol=1e-6)  # clipped by its own norm 5


def test_frozen_mask_marks_the_frozen_levels_parameters():
    from nl_jax.levels import frozen_mask
    levels = dict(norms=dict(params=".*norm.*", every="never"),
                  rest=dict(params=".*", every=1, optimizer=sgd()))
    levels = dict(norms=levels["norms"], rest=dict(levels["rest"], params="(?!.*norm).*"))
    mask = frozen_mask(levels, tiny_params())
    assert mask["blocks"][0]["norm"]["scale"] and mask["blocks"][1]["norm"]["scale"]
    assert not mask["embed"] and not mask["blocks"][0]["mixer"]["wq"]["kernel"]


def test_level_schedule_runs_over_its_own_updates():
    params = {"w": jnp.zeros(1)}
    spec = dict(name="sgd", learning_rate=1.0,
                schedule=dict(name="warmup_linear", warmup_steps=1, end_factor=0.0))
    tx = build_levels(dict(a=dict(params="w", every=2, optimizer=spec)), params,
                      total_steps=8)  # 4 level updates: lr 0, 1, 2/3, 1/3
    state = tx.init(params)
    lrs = []
    for _ in range(8):
        _, state = tx.update({"w": jnp.ones(1)}, state, params)
        lrs.append(float(level_metrics(state)["lr/a"]))
    np.testing.assert_allclose(lrs[1::2], [0.0, 1.0, 2 / 3, 1 / 3], rtol=1e-6)


def test_levels_state_resumes_bitwise_through_orbax(tmp_path):
    params = tiny_params()
    levels = dict(
        embed=dict(params="embed", every=1, optimizer=dict(name="adamw", learning_rate=0.1)),
        blocks=dict(params="blocks/0/.*", every=2,
                    optimizer=dict(name="m3", learning_rate=0.01, slow_every=2)),
        rest=dict(params="blocks/1/.*", every="never", optimizer=sgd()))
    tx = build_levels(levels, params, total_steps=8, grad_clip_norm=1.0)

    def loss(p):
        return sum(jnp.sum(jnp.cos(x * (i + 1))) for i, x in enumerate(jax.tree.leaves(p)))

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(3):
        p, s = step(p, s)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "c", {"p": p, "s": s})
    ckpt.wait_until_finished()
    r = ckpt.restore(tmp_path / "c", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                  {"p": p, "s": s}))
    ckpt.close()
    rp, rs = r["p"], r["s"]
    for _ in range(3):
        p, s = step(p, s)
        rp, rs = step(rp, rs)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((rp, rs)), strict=True):
        np.testing.assert_array_equal(a, b)


# -- errors ------------------------------------------------------------------------
def expect_error(levels, *fragments, params=None):
    with pytest.raises(ConfigError) as e:
        build_levels(levels, params or tiny_params(), total_steps=10)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_parameter_matched_by_no_level():
    expect_error(dict(a=dict(params="blocks/.*", every=1, optimizer=sgd())),
                 "'embed'", "no level")


def test_parameter_matched_by_two_levels():
    expect_error(dict(a=dict(params=".*", every=1, optimizer=sgd()),
                      b=dict(params="embed", every=1, optimizer=sgd())),
                 "'embed'", "'a'", "'b'")


def test_level_matching_nothing():
    expect_error(dict(a=dict(params=".*", every=1, optimizer=sgd()),
                      ghost=dict(params="unembed/.*", every=1, optimizer=sgd())),
                 "ghost", "unembed/.*")


def test_fullmatch_is_required():
    # "embed" alone does not cover "blocks/..." even though re.search would find nothing
    # there; a partial pattern like "wq" matches no whole path.
    expect_error(dict(a=dict(params="embed|blocks/.*/norm/.*", every=1, optimizer=sgd()),
                      b=dict(params="wq", every=1, optimizer=sgd())),
                 "blocks/0/mixer/wq/kernel")


def test_unknown_optimizer_in_a_level():
    expect_error(dict(a=dict(params=".*", every=1,
                             optimizer=dict(name="lion", learning_rate=1e-3))),
                 "levels.a.optimizer.name", "'lion'", "adamw", "m3", "dmgd")


def test_unknown_hyperparameter_in_a_level():
    expect_error(dict(a=dict(params=".*", every=1,
                             optimizer=dict(name="m3", learning_rate=1e-3, beta=0.9))),
                 "levels.a.optimizer.beta", "'m3'", "slow_every")


def test_a_period_longer_than_the_run_is_flagged(caplog):
    params = {"w": jnp.zeros(1)}
    with caplog.at_level("WARNING"):
        build_levels(dict(a=dict(params="w", every=8, optimizer=sgd())), params,
                     total_steps=8)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        build_levels(dict(a=dict(params="w", every=9, optimizer=sgd())), params,
                     total_steps=8)
    assert "levels.a.every=9 exceeds the 8 training steps" in caplog.text


def test_frozen_level_optimizer_spec_is_still_checked():
    expect_error(dict(a=dict(params=".*", every="never",
                             optimizer=dict(name="adamx", learning_rate=1e-3))),
                 "levels.a.optimizer.name", "'adamx'")


@pytest.mark.parametrize("every", [0, -2, 1.5, "sometimes", True])
def test_bad_every(every):
    expect_error(dict(a=dict(params=".*", every=every, optimizer=sgd())),
                 "levels.a.every", "never")


def test_bad_regex_and_unknown_level_key():
    expect_error(dict(a=dict(params="blocks/(", every=1, optimizer=sgd())),
                 "levels.a.params")
    expect_error(dict(a=dict(params=".*", every=1, optimizer=sgd(), period=3)),
                 "levels.a", "'period'")


# -- experiment configs --------------------------------------------------------------
OPTIMIZER_EXPERIMENTS = ("adamw", "muon", "m3", "delta_momentum", "dmgd", "two_levels")


@pytest.mark.parametrize("name", OPTIMIZER_EXPERIMENTS)
def test_optimizer_experiments_change_only_levels_and_build(name):
    import importlib

    from experiments import base
    from nl_jax.train.state import abstract_model

    config = importlib.import_module(f"experiments.optimizers.{name}").get_config()
    reference = base.get_config()
    for key in reference:
        if key != "levels":
            assert config[key].to_dict() == reference[key].to_dict(), key
    _, params = abstract_model(config.model, 0)
    tx = build_levels(config.levels, params, total_steps=config.train.steps,
                      grad_clip_norm=config.train.grad_clip_norm)
    state = jax.eval_shape(tx.init, params)
    metrics = jax.eval_shape(level_metrics, state)
    from nl_jax.levels import assign_labels
    labels = set(assign_labels(config.levels, params)[1].values())
    assert {label.removesuffix(".fallback") for label in labels} == set(config.levels)
    # a matrix optimizer's level sends its norm scales to the AdamW fallback
    assert ("default.fallback" in labels) == (name in ("muon", "m3", "delta_momentum"))
    assert set(metrics) == ({f"lr/{n}" for n in labels} | {f"updates/{n}" for n in labels})
