"""``model.cms.lr`` is the operative step size of Hope's in-context CMS level.

At the shipped Hope tiny CMS settings the chunk step of Eq. 71 is the plain
summed gradient step (the trust ratio of ``bounded_update`` does not bind at
init), so the level's outputs change with ``cms.lr``, to first order in
proportion to it; the bound still holds at any learning rate; ``lr = 0``
moves nothing.  (Before: lr 1e-3 with max_update 0.005 made the raw step
6-17x the cap on every chunk, and outputs at lr 1e-3, 1e-2, 1e-1 agreed to
6e-7.)

Inputs are unit-RMS random vectors, as the CMS reads them after the block's
RMSNorm; on them the ratio |raw step| / (max_update |theta|) matches the one
measured inside Hope tiny at init.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from nl_jax.configs.hope import tiny
from nl_jax.memory.cms import bounded_update, chunk_gradient
from nl_jax.models.cms import ContinuumMemory

B = 2


def build(**changes):
    """Hope tiny's CMS (periods (32, never), SwiGLU, d 128, d_ff 384) with its
    shipped cms settings, changed by ``changes``."""
    m = tiny.get_config().model
    cms = dict(m.cms)
    cms.update(changes)
    cfg = ml_collections.ConfigDict(dict(d_model=m.d_model, d_ff=m.d_ff, dtype="float32",
                                         cms=cms))
    return ContinuumMemory(cfg, rngs=nnx.Rngs(0))


def inputs(t=128, seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, t, tiny.get_config().model.d_model))
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True))


def chunk_steps(level, x):
    """The level's chunk loop (as in ``memory/cms.py``): per chunk, the ratio
    ``|raw step| / (max_update |theta|)`` and the applied update, per matrix and
    sequence; and the final weights."""
    theta = {k: jnp.broadcast_to(v, (B,) + v.shape) for k, v in level.weights().items()}
    ratios, moves, norms = [], [], []
    for start in range(0, x.shape[1] - level.period + 1, level.period):
        x_c = x[:, start:start + level.period]
        _, grad = chunk_gradient(level.block, theta, x_c, level.value_target(x_c),
                                 level.learning_rate(x_c), jnp.float32)
        new = bounded_update(theta, grad, level.max_update)
        for k in theta:
            w_norm = jnp.linalg.norm(theta[k].reshape(B, -1), axis=-1)
            ratios.append(jnp.linalg.norm(grad[k].reshape(B, -1), axis=-1)
                          / (level.max_update * w_norm))
            moves.append(jnp.linalg.norm((new[k] - theta[k]).reshape(B, -1), axis=-1))
            norms.append(w_norm)
        theta = new
    return (np.asarray(jnp.stack(ratios)), np.asarray(jnp.stack(moves)),
            np.asarray(jnp.stack(norms)), theta)


def test_default_step_is_below_the_trust_ratio():
    """At the shipped lr the bound is a safety net: no chunk step of the level
    reaches it at init (the raw step is the applied step)."""
    cms = build()
    level = cms.levels[0]
    assert level.in_context and level.max_update > 0
    ratios, _, _, theta = chunk_steps(level, inputs())
    assert ratios.max() < 0.8, ratios.max()          # headroom for training growth
    assert ratios.min() > 0.0
    # the loop above is the level's own chunk loop
    _, state = cms(inputs())
    for k, w in state[0].theta.items():
        np.testing.assert_allclose(w, theta[k], rtol=1e-5, atol=1e-7)


def test_outputs_follow_cms_lr():
    """Outputs at lr/4, lr, 4 lr (lr the default) differ far beyond float noise, and,
    below the bound, the change from lr = 0 is proportional to lr to first order."""
    lr = tiny.get_config().model.cms.lr
    x = inputs()

    def out(scale):
        y, _ = build(lr=scale * lr)(x)
        return np.asarray(y, np.float64)

    y0, y_q, y1, y4 = out(0.0), out(0.25), out(1.0), out(4.0)
    scale = np.abs(y1).max()
    for a, b in ((y_q, y1), (y1, y4), (y_q, y4)):
        assert np.abs(a - b).max() > 1e-4 * scale, np.abs(a - b).max() / scale
    d1, d_q = y1 - y0, y_q - y0
    assert np.abs(d1).max() > 1e-3 * scale
    np.testing.assert_allclose(d_q, 0.25 * d1, atol=0.05 * np.abs(d1).max())


@pytest.mark.parametrize("lr_scale", [1.0, 1e2, 1e4])
def test_trust_ratio_still_bounds_every_chunk_step(lr_scale):
    """|theta_new - theta| <= max_update |theta| per matrix, sequence and chunk, at
    the default lr and far past it (where the bound binds: the explosion of
    ``bounded_update``'s docstring is prevented)."""
    lr = tiny.get_config().model.cms.lr
    level = build(lr=lr_scale * lr).levels[0]
    ratios, moves, norms, theta = chunk_steps(level, 3.0 * inputs())
    assert np.all(moves <= level.max_update * norms * (1 + 1e-5)), (moves / norms).max()
    if lr_scale == 1e4:
        assert ratios.min() > 1.0     # binds on every step, and the step is the cap
        np.testing.assert_allclose(moves, level.max_update * norms, rtol=1e-4)
    assert all(np.isfinite(np.asarray(w)).all() for w in theta.values())


def test_zero_lr_moves_nothing():
    cms = build(lr=0.0)
    x = inputs()
    y, state = cms(x)
    level = cms.levels[0]
    for k, w in level.weights().items():
        np.testing.assert_array_equal(np.asarray(state[0].theta[k]),
                                      np.broadcast_to(np.asarray(w), state[0].theta[k].shape))
    frozen = sum_levels_frozen(cms, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(frozen), rtol=1e-5, atol=2e-5)


def sum_levels_frozen(cms, x):
    """The sequential CMS with every level frozen: sum of the level increments."""
    h, y = x, None
    for level in cms.levels:
        delta = level.frozen(h)
        y = delta if y is None else y + delta
        h = h + delta
    return y
