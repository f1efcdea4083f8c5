"""``model.remat``: recomputing each block in the backward pass changes nothing but memory."""

import importlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nl_jax.errors import ConfigError
from nl_jax.models.lm import LanguageModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_cfg(family: str, remat: bool, n_layers: int = 3):
    cfg = importlib.import_module(f"experiments.{family}.tiny").get_config().model
    cfg.n_layers, cfg.remat = n_layers, remat
    return cfg


def grad_step(cfg, tokens):
    """The jitted value_and_grad of the next-token loss, and the parameters."""
    graphdef, params, rest = nnx.split(LanguageModel(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params, rest)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return jax.jit(jax.value_and_grad(loss)), params


@pytest.mark.parametrize("family", ["transformer", "titans"])
def test_remat_keeps_loss_and_gradients(family):
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 129), 0, 2048)
    (v0, g0), (v1, g1) = (fn(p) for fn, p in (grad_step(model_cfg(family, r), tokens)
                                              for r in (False, True)))
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6 * max(1.0, float(jnp.abs(b).max())))


def test_remat_cuts_the_compiled_step_memory():
    """XLA:CPU's default (concurrency-optimised) scheduler runs every block's
    recomputation early, before the backward needs it, which undoes the saving
    on CPU; with the memory-minded scheduler (as on TPU/GPU) remat must cut it."""
    script = (
        "import jax\n"
        "from tests.test_lm_remat import grad_step, model_cfg\n"
        "tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 513), 0, 2048)\n"
        "for remat in (False, True):\n"
        "    fn, params = grad_step(model_cfg('transformer', remat, 6), tokens)\n"
        "    print(fn.lower(params).compile().memory_analysis().temp_size_in_bytes)\n")
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    plain, remat = (int(x) for x in out[-2:])
    assert remat < 0.7 * plain, (remat, plain)


def test_remat_must_be_a_bool():
    cfg = model_cfg("transformer", False).to_dict()
    cfg["remat"] = "yes"
    with pytest.raises(ConfigError, match=r"model\.remat must be True or False"):
        LanguageModel(ml_collections.ConfigDict(cfg), rngs=nnx.Rngs(0))
