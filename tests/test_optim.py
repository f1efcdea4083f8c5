"""Optimizers (nl_jax.optim) against their equations, with numbers worked out by hand."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nl_jax.errors import ConfigError
from nl_jax.optim import OPTIMIZERS, build_optimizer, build_schedule
from nl_jax.optim.dmgd import inner_gradients, memory_read
from nl_jax.optim.newton_schulz import newton_schulz


def run(spec, grads_seq, params, total_steps=100):
    """Updates of ``spec`` for a sequence of gradient trees (params held fixed)."""
    tx = build_optimizer(spec, total_steps)
    state = tx.init(params)
    out = []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        out.append(u)
    return out, state


def arr(x):
    return jnp.asarray(x, jnp.float32)


def close(a, b, tol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# -- schedules ------------------------------------------------------------------------
def test_schedules_have_the_documented_values():
    cos = build_schedule(dict(name="warmup_cosine", warmup_steps=2, end_factor=0.1), 1.0, 6)
    lin = build_schedule(dict(name="warmup_linear", warmup_steps=2, end_factor=0.1), 1.0, 6)
    const = build_schedule(dict(name="constant"), 0.5, 6)
    warm = build_schedule(dict(name="warmup_constant", warmup_steps=4), 2.0, 6)
    close([cos(t) for t in (0, 1, 2, 4, 6)], [0.0, 0.5, 1.0, 0.55, 0.1])
    close([lin(t) for t in (0, 1, 2, 3, 4, 6)], [0.0, 0.5, 1.0, 0.775, 0.55, 0.1])
    close([const(t) for t in (0, 3)], [0.5, 0.5])
    close([warm(t) for t in (0, 1, 4, 5)], [0.0, 0.5, 2.0, 2.0])


def test_learning_rate_is_logged_from_the_schedule():
    spec = dict(name="sgd", learning_rate=1.0,
                schedule=dict(name="warmup_linear", warmup_steps=2, end_factor=0.0))
    p = {"w": arr([1.0])}
    tx = build_optimizer(spec, total_steps=4)
    state = tx.init(p)
    lrs = []
    for _ in range(4):
        u, state = tx.update({"w": arr([1.0])}, state, p)
        lrs.append(float(state.hyperparams["learning_rate"]))
        close(u["w"], [-lrs[-1]])
    close(lrs, [0.0, 0.5, 1.0, 0.5])
    assert int(state.count) == 4


# -- first-order optimizers ------------------------------------------------------------
def test_sgd_is_minus_lr_times_gradient():
    (u,), _ = run(dict(name="sgd", learning_rate=0.1), [{"w": arr([[1, -2], [3, 4]])}],
                  {"w": jnp.zeros((2, 2))})
    close(u["w"], [[-0.1, 0.2], [-0.3, -0.4]])


def test_adamw_first_step_is_sign_plus_decoupled_decay():
    spec = dict(name="adamw", learning_rate=0.1, weight_decay=0.01, eps=0.0)
    (u,), _ = run(spec, [{"w": arr([[2, -3], [0.5, 1]])}], {"w": arr([[1, 1], [1, 2]])})
    # bias-corrected m/sqrt(v) = sign(g); decay adds -lr * wd * p
    close(u["w"], [[-0.101, 0.099], [-0.101, -0.102]])


def test_momentum_eq_33_34():
    g1, g2 = arr([[1, 2], [3, 4]]), arr([[0.5, -1], [2, 0]])
    (u1, u2), _ = run(dict(name="momentum", learning_rate=0.1, momentum=0.5),
                      [{"w": g1}, {"w": g2}], {"w": jnp.zeros((2, 2))})
    close(u1["w"], [[-0.1, -0.2], [-0.3, -0.4]])      # m1 = -lr g1
    close(u2["w"], [[-0.1, 0.0], [-0.35, -0.2]])      # m2 = a m1 - lr g2


def test_preconditioned_momentum_eq_46_47():
    spec = dict(name="preconditioned_momentum", learning_rate=0.1, momentum=0.5, b2=0.5,
                eps=0.0)
    (u1, u2), _ = run(spec, [{"b": arr([2, -1])}, {"b": arr([1, 1])}], {"b": jnp.zeros(2)})
    # v1 = [2, .5], vhat1 = g1^2 -> P g1 = sign(g1); v2 = [1.5, .75], vhat2 = v2/.75 = [2, 1]
    close(u1["b"], [-0.1, 0.1])
    close(u2["b"], [-0.05 - 0.1 / np.sqrt(2.0), 0.05 - 0.1])


def test_delta_momentum_eq_48_49_vector():
    spec = dict(name="delta_momentum", learning_rate=0.1, momentum=0.5)
    (u1, u2), _ = run(spec, [{"b": arr([1, 2])}, {"b": arr([0.5, 0])}], {"b": jnp.zeros(2)})
    close(u1["b"], [-0.1, -0.2])
    # a m1 - (m1 . g2) g2 - lr g2 = [-.05, -.1] - (-.05)[.5, 0] - [.05, 0]
    close(u2["b"], [-0.075, -0.1])


def test_delta_momentum_eq_48_49_matrix():
    spec = dict(name="delta_momentum", learning_rate=0.1, momentum=0.5)
    g1, g2 = arr([[1, 0], [0, 2]]), arr([[1, 1], [0, 0]])
    (u1, u2), _ = run(spec, [{"w": g1}, {"w": g2}], {"w": jnp.zeros((2, 2))})
    close(u1["w"], [[-0.1, 0.0], [0.0, -0.2]])
    # M1 (aI - G2^T G2) = M1 [[-.5, -1], [-1, -.5]] = [[.05, .1], [.2, .1]]; minus .1 G2
    close(u2["w"], [[-0.05, 0.0], [0.2, 0.1]])


def test_delta_momentum_wide_matrix_uses_same_rule():
    # rows < cols takes the (m G^T) G route; compare with the d x d formula in numpy
    rng = np.random.default_rng(0)
    gs = [rng.normal(size=(2, 3)).astype(np.float32) * 0.5 for _ in range(3)]
    outs, _ = run(dict(name="delta_momentum", learning_rate=0.1, momentum=0.9),
                  [{"w": arr(g)} for g in gs], {"w": jnp.zeros((2, 3))})
    m = np.zeros((2, 3))
    for g, u in zip(gs, outs, strict=True):
        m = m @ (0.9 * np.eye(3) - g.T @ g) - 0.1 * g
        close(u["w"], m, 1e-5)


# -- Newton-Schulz, Muon, M3 ------------------------------------------------------------
def test_newton_schulz_one_step_by_hand():
    # O0 = x / ||x||_F = [[0, .6], [.8, 0]];  O1 = 1.5 O0 - .5 O0 O0^T O0
    close(newton_schulz(arr([[0, 3], [4, 0]]), steps=1), [[0, 0.792], [0.944, 0]], 1e-5)


def test_newton_schulz_is_a_gradient_step_on_orthogonality_loss():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)), jnp.float32)
    o = x / jnp.linalg.norm(x)
    loss = lambda o: 0.25 * jnp.sum((o.T @ o - jnp.eye(2)) ** 2)  # noqa: E731
    close(newton_schulz(x, steps=1, step_size=0.3), o - 0.3 * jax.grad(loss)(o), 1e-5)


def test_newton_schulz_converges_to_polar_factor():
    x = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    close(newton_schulz(arr(x), steps=40), u @ vt, 1e-4)
    close(newton_schulz(arr(x.T), steps=40), (u @ vt).T, 1e-4)   # wide: other Gram


def test_newton_schulz_orthogonalises_each_matrix_of_a_stack():
    """[heads, d, d] (per-head memory states): heads are orthogonalised one by one,
    so a head with a 10x larger gradient does not shrink the others."""
    x = np.random.default_rng(3).normal(size=(3, 4, 4)).astype(np.float32)
    x[1] *= 10
    stacked = newton_schulz(arr(x), steps=40)
    for h in range(3):
        close(stacked[h], newton_schulz(arr(x[h]), steps=40), 1e-5)
        close(stacked[h].T @ stacked[h], np.eye(4), 1e-3)


def test_delta_momentum_treats_a_stack_as_separate_matrices():
    from nl_jax.optim.momentum import delta_rule_decay
    rng = np.random.default_rng(4)
    m, g = (arr(rng.normal(size=(2, 3, 5))) for _ in range(2))
    out = delta_rule_decay(m, g, 0.9)
    for h in range(2):
        close(out[h], m[h] @ (0.9 * np.eye(5) - g[h].T @ g[h]), 1e-5)


def test_newton_schulz_optimizer_orthogonalises_matrices_only():
    spec = dict(name="newton_schulz", learning_rate=0.1, steps=1)
    (u,), _ = run(spec, [{"w": arr([[0, 3], [4, 0]]), "b": arr([2, -1])}],
                  {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    close(u["w"], [[0, -0.0792], [-0.0944, 0]], 1e-5)
    close(u["b"], [-0.2, 0.1])


def test_muon_on_a_scaled_identity():
    # constant gradient: bias-corrected (Nesterov) momentum = g; NS_quintic(I/sqrt 2) = s I
    s = 1 / np.sqrt(2.0)
    for _ in range(5):
        s = 3.4445 * s - 4.7750 * s ** 3 + 2.0315 * s ** 5
    g = {"w": 2.0 * jnp.eye(2), "b": arr([3, -1])}
    outs, _ = run(dict(name="muon", learning_rate=0.1, b1=0.9, eps=0.0),
                  [g, g], {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    for t, u in enumerate(outs, start=1):
        close(u["w"], -0.1 * s * np.eye(2), 1e-5)
        # vectors take Nesterov Adam: m_hat = b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)
        # with m_t = (1 - b1^t) g and sqrt(v_hat) = |g|
        nesterov = 0.9 * (1 - 0.9 ** t) / (1 - 0.9 ** (t + 1)) + 0.1 / (1 - 0.9 ** t)
        close(u["b"], [-0.1 * nesterov, 0.1 * nesterov], 1e-5)


def m3_spec(**kw):
    return dict(name="m3", learning_rate=0.1, b1=1.0, b2=1.0, b3=1.0, alpha=0.5, eps=0.5,
                slow_every=2, ns_steps=1, **kw)


def test_m3_algorithm_1_by_hand():
    grads = [{"w": jnp.diag(arr([3, 4])), "b": arr([2, -1])},
             {"w": jnp.diag(arr([4, 3])), "b": arr([2, -1])},
             {"w": jnp.zeros((2, 2)), "b": arr([0, 0])}]
    (u1, u2, u3), _ = run(m3_spec(), grads, {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
    # step 1: O1 = NS(diag(3,4)) = diag(.792,.944), sqrt V = diag(3,4), no slow term yet
    close(u1["w"], np.diag([-0.1 * 0.792 / 3.5, -0.1 * 0.944 / 4.5]), 1e-6)
    # step 2: M1 = 7 I -> O1 = 1.5/sqrt2 - .5/sqrt2^3 = .88388 I, sqrt V = 5 I; O2 still 0
    ns7 = 1.5 / np.sqrt(2) - 0.5 / np.sqrt(2) ** 3
    close(u2["w"], -0.1 * ns7 / 5.5 * np.eye(2), 1e-6)
    # after step 2 (f = 2): M2 = g1 + g2 = 7 I -> O2 = .88388 I, used from step 3 on
    close(u3["w"], -0.1 * (ns7 + 0.5 * ns7) / 5.5 * np.eye(2), 1e-6)
    # vectors: NS replaced by the identity
    close(u1["b"], [-0.08, 0.1 / 1.5], 1e-6)
    close(u2["b"], [-0.4 / (np.sqrt(8) + 0.5), 0.2 / (np.sqrt(2) + 0.5)], 1e-6)
    close(u3["b"], [-0.6 / (np.sqrt(8) + 0.5), 0.3 / (np.sqrt(2) + 0.5)], 1e-6)


def test_m3_decays_and_weight_decay():
    p = {"b": arr([1.0, 2.0])}
    spec = m3_spec(decay1=0.5, decay2=0.5, weight_decay=0.1)
    (u1, u2), _ = run(spec, [{"b": arr([2, 2])}, {"b": arr([2, 2])}], p)
    # M1 = .5*2 + 2 = 3, V = .5*4 + 4 = 6 at step 2; decay adds -lr wd p
    close(u1["b"], -0.1 * (2 / 2.5) - 0.01 * np.array([1.0, 2.0]), 1e-6)
    close(u2["b"], -0.1 * (3 / (np.sqrt(6) + 0.5)) - 0.01 * np.array([1.0, 2.0]), 1e-6)


# -- DMGD ----------------------------------------------------------------------------
def test_dmgd_without_hidden_units_is_momentum():
    g1, g2 = arr([[1, 2], [3, 4]]), arr([[0.5, -1], [2, 0]])
    (u1, u2), _ = run(dict(name="dmgd", learning_rate=0.1, momentum=0.5, hidden=0),
                      [{"w": g1}, {"w": g2}], {"w": jnp.zeros((2, 2))})
    close(u1["w"], [[-0.1, -0.2], [-0.3, -0.4]])
    close(u2["w"], [[-0.1, 0.0], [-0.35, -0.2]])


def test_dmgd_inner_gradients_are_those_of_the_dot_objective():
    rng = np.random.default_rng(3)
    u = arr(rng.normal(size=(3, 2)))
    b, w1, w2 = (arr(rng.normal(size=s)) for s in ((3, 2), (2, 4), (4, 2)))
    objective = lambda b, w1, w2: jnp.sum(memory_read(b, w1, w2, u) * u)  # noqa: E731
    auto = jax.grad(objective, argnums=(0, 1, 2))(b, w1, w2)
    for closed, ad in zip(inner_gradients(w1, w2, u), auto, strict=True):
        close(closed, ad, 1e-5)


def test_dmgd_eq_50_two_steps():
    a, lr, scale = 0.5, 0.1, 2.0
    spec = dict(name="dmgd", learning_rate=lr, momentum=a, hidden=2, mlp_lr_scale=scale)
    gs = [np.array([[1.0, -2.0]]), np.array([[0.5, 1.5]])]
    outs, _ = run(spec, [{"w": arr(g)} for g in gs], {"w": jnp.zeros((1, 2))})
    tx = build_optimizer(spec, 100)
    w1 = np.asarray(tx.init({"w": jnp.zeros((1, 2))}).inner_state.w1["w"], np.float64)
    b, w2 = np.zeros((1, 2)), np.zeros((2, 2))
    for g, u in zip(gs, outs, strict=True):
        h = np.tanh(g @ w1)
        d_w2 = h.T @ g
        d_w1 = g.T @ ((g @ w2.T) * (1 - h * h))
        b = a * b - lr * g                       # dL2/dB = u
        w1 = w1 - lr * scale * d_w1
        w2 = a * w2 - lr * scale * d_w2
        close(u["w"], b + np.tanh(g @ w1) @ w2, 1e-5)   # W += M_{phi_{i+1}}(u_i)
    assert np.abs(w2).max() > 1e-3   # the MLP branch is active


# -- registry errors ---------------------------------------------------------------
def test_unknown_optimizer_lists_registered_names():
    with pytest.raises(ConfigError) as e:
        build_optimizer(dict(name="adamx", learning_rate=1e-3), 10, where="levels.a.optimizer")
    msg = str(e.value)
    assert "adamx" in msg and "levels.a.optimizer.name" in msg
    assert all(name in msg for name in OPTIMIZERS)


def test_unknown_hyperparameter_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError) as e:
        build_optimizer(dict(name="muon", learning_rate=1e-3, beta=0.9), 10)
    msg = str(e.value)
    assert "'beta'" in msg and "muon" in msg and "b1" in msg and "ns_steps" in msg


def test_bad_values_are_config_errors():
    for spec in (dict(name="m3", learning_rate=1e-3, slow_every=0),
                 dict(name="adamw", learning_rate="fast"),
                 dict(name="adamw"),
                 dict(name="adamw", learning_rate=1e-3, schedule=dict(name="step")),
                 dict(name="adamw", learning_rate=1e-3,
                      schedule=dict(name="constant", warmup_steps=3))):
        with pytest.raises(ConfigError):
            build_optimizer(spec, 10)


@pytest.mark.parametrize("spec, needle", [
    (dict(name="sgd", learning_rate=-1e-3), "learning_rate=-0.001 must be a finite number >= 0"),
    (dict(name="adamw", learning_rate=1e-3, b2=1.0), "b2=1.0 must be a number in [0, 1)"),
    (dict(name="muon", learning_rate=1e-3, b1=-0.1), "b1=-0.1 must be a number in [0, 1)"),
    (dict(name="m3", learning_rate=1e-3, eps=float("nan")), "eps=nan must be a finite"),
    (dict(name="momentum", learning_rate=1e-3, momentum=-0.5), "momentum=-0.5 must be")])
def test_out_of_range_hyperparameters_are_named(spec, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        build_optimizer(spec, 10)


def test_m3_weight_decay_without_params_is_an_error():
    from nl_jax.optim.m3 import m3
    tx = m3(0.1, weight_decay=0.1)
    g = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        tx.update(g, tx.init(g))
    plain = m3(0.1)
    plain.update(g, plain.init(g))   # no decay: params are not needed
    registered = build_optimizer(dict(name="m3", learning_rate=0.1), 10)  # injected 0.0
    registered.update(g, registered.init(g))
    decayed = build_optimizer(dict(name="m3", learning_rate=0.1, weight_decay=0.1), 10)
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        decayed.update(g, decayed.init(g))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_eager_init_state_can_be_donated(name):
    """tx.init outside jit, then a donated jitted step: no field may share a buffer."""
    tx = build_optimizer(dict(name=name, learning_rate=0.01), 10)
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones((2,))}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p), donate_argnums=1)
    state = tx.init(params)
    for _ in range(2):
        _, state = step(params, state, params)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))


def _scaled_params_step(tx, state, params):
    return tx.update(jax.tree.map(lambda x: x * 0.1, params), state, params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_bf16_params_keep_an_fp32_state_of_fixed_dtypes(name):
    """Optimizer state stays fp32 and keeps its dtypes step after step, so a jitted
    step never retraces and a bf16 level with every > 1 builds (lax.cond)."""
    from nl_jax.levels import build_levels
    params = {"w": jnp.full((3, 2), 0.5, jnp.bfloat16), "b": jnp.ones((2,), jnp.bfloat16)}
    for every in (1, 3):
        tx = build_levels(dict(a=dict(params=".*", every=every,
                                      optimizer=dict(name=name, learning_rate=0.01))),
                          params, total_steps=6)
        state = tx.init(params)
        dtypes = [x.dtype for x in jax.tree.leaves(state)]
        assert all(d != jnp.bfloat16 for d in dtypes)
        step = jax.jit(functools.partial(_scaled_params_step, tx))
        for _ in range(3):
            u, state = step(state, params)
            assert [x.dtype for x in jax.tree.leaves(state)] == dtypes
            assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
        assert step._cache_size() == 1


# -- checkpoint / resume exactness ---------------------------------------------------
def _quadratic_grads(params):
    target = {"w": jnp.arange(6.0).reshape(3, 2) / 6, "b": jnp.array([0.5, -0.5])}
    return jax.grad(lambda p: sum(jnp.sum((p[k] - target[k]) ** 3 + (p[k] - target[k]) ** 2)
                                  for k in p))(params)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_from_checkpoint_is_bitwise(name, tmp_path):
    spec = dict(name=name, learning_rate=0.01,
                schedule=dict(name="warmup_cosine", warmup_steps=2, end_factor=0.1))
    if name == "m3":
        spec["slow_every"] = 2
    tx = build_optimizer(spec, total_steps=6)
    params = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.array([0.1, 0.2])}

    @jax.jit
    def step(params, state):
        u, state = tx.update(_quadratic_grads(params), state, params)
        return jax.tree.map(jnp.add, params, u), state

    p, s = params, tx.init(params)
    for _ in range(3):
        p, s = step(p, s)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "ckpt", jax.tree.map(
        ocp.utils.to_shape_dtype_struct, {"params": p, "opt_state": s}))
    ckpt.close()
    rp, rs = restored["params"], restored["opt_state"]
    for _ in range(3):
        p, s = step(p, s)
        rp, rs = step(rp, rs)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((rp, rs)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(s) == jax.tree.structure(rs)


# -- benchmark entry point ------------------------------------------------------------
def test_bench_optimizers_writes_rows_and_plot(tmp_path, capsys):
    import json

    from nl_jax.bench import optimizers as bench
    from nl_jax.bench import tiny_lm

    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(256)) * 60)
    out = tmp_path / "b" / "rows.json"
    assert bench.main(["--steps", "3", "--optimizers", "adamw", "--text", str(text),
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["optimizer"] for r in rows] == ["adamw"]
    assert np.isfinite(rows[0]["final_loss"]) and rows[0]["step_ms"] > 0
    assert (tmp_path / "b" / "rows.png").stat().st_size > 1000
    assert "adamw" in capsys.readouterr().out
    np.testing.assert_array_equal(tiny_lm.batches(np.arange(1000), 2, 3, 4, seed=1),
                                  tiny_lm.batches(np.arange(1000), 2, 3, 4, seed=1))


# -- recipes and fallbacks --------------------------------------------------------------
def test_check_spec_says_did_you_mean_and_guards_the_fallback():
    from nl_jax.optim import check_spec, resolve_spec
    with pytest.raises(ConfigError, match="did you mean 'muon'"):
        check_spec(dict(name="mu0n", learning_rate=1e-3), where="levels.a.optimizer")
    with pytest.raises(ConfigError, match="matrix optimizers only"):
        check_spec(dict(name="adamw", learning_rate=1e-3, fallback=dict(name="sgd",
                                                                          learning_rate=1.0)))
    with pytest.raises(ConfigError, match="cannot be a matrix optimizer"):
        check_spec(dict(name="muon", learning_rate=1e-3,
                        fallback=dict(name="m3", learning_rate=1e-3)))
    full = resolve_spec(dict(name="muon", learning_rate=1e-3))
    assert full["b2"] == 0.999 and full["schedule"] == dict(name="constant")
    assert full["fallback"]["name"] == "adamw" and full["fallback"]["weight_decay"] == 0.1
    assert resolve_spec(dict(name="m3", learning_rate=1e-3, fallback="none"))["fallback"] == "none"


@pytest.mark.parametrize("name", ["adamw", "muon", "m3", "delta_momentum", "dmgd"])
def test_recipes_are_the_experiment_settings(name):
    """The one-flag swap installs the settings of experiments/optimizers/<name>.py."""
    import importlib

    from nl_jax.optim import recipe
    levels = importlib.import_module(f"experiments.optimizers.{name}").get_config().levels
    spec = recipe(name)
    spec.pop("fallback", None)
    mine = levels.default.optimizer.to_dict()
    assert {k: spec[k] for k in mine} == mine
    if name in ("muon", "m3"):     # their embeddings level is the fallback's AdamW
        from experiments.optimizers import common
        from nl_jax.optim import COMPANION
        emb = levels.embeddings.optimizer.to_dict()
        assert {k: COMPANION[k] for k in emb} == emb
        assert {k: COMPANION[k] for k in common.COMPANION} == common.COMPANION
