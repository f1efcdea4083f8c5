"""The language model wrapper: causality of every family, fp32 logits under bf16."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nl_jax.models.lm import LanguageModel

T, CUT = 48, 21   # CUT sits inside a memory chunk, a CMS chunk and a MAC segment


def small(config: str, mixer: str | None = None, dtype: str = "float32"):
    cfg = importlib.import_module(f"experiments.{config}").get_config().model
    cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.n_layers = 97, 32, 2, 64, 2
    cfg.dtype = dtype
    if mixer is not None:
        cfg.mixer = mixer
    return cfg


FAMILIES = [("transformer.tiny", None), ("titans.tiny", "titans_lmm"),
            ("titans.tiny", "titans_mag"), ("titans.tiny", "titans_mac"),
            ("titans.tiny", "titans_mal"), ("hope.tiny", None), ("hope.attention", None)]


@pytest.mark.parametrize("config,mixer", FAMILIES)
def test_no_position_sees_a_later_token(config, mixer):
    """Changing token CUT leaves every logit before CUT bit-identical and changes CUT's."""
    model = LanguageModel(small(config, mixer), rngs=nnx.Rngs(0))
    forward = jax.jit(lambda tokens: model(tokens)[0])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, T), 0, 97)
    changed = tokens.at[0, CUT].set((tokens[0, CUT] + 1) % 97)
    a, b = np.asarray(forward(tokens)), np.asarray(forward(changed))
    np.testing.assert_array_equal(a[:, :CUT], b[:, :CUT])
    assert np.abs(a[:, CUT] - b[:, CUT]).max() > 1e-4


def test_bf16_compute_gives_fp32_logits_off_the_bf16_grid():
    """The unembedding accumulates in fp32: logits are not rounded to bf16."""
    for tie in (True, False):
        cfg = small("transformer.tiny", dtype="bfloat16")
        cfg.tie_embeddings = tie
        logits, _ = LanguageModel(cfg, rngs=nnx.Rngs(0))(jnp.arange(16)[None])
        assert logits.dtype == jnp.float32
        on_grid = logits == logits.astype(jnp.bfloat16).astype(jnp.float32)
        assert float(jnp.mean(on_grid)) < 0.5, tie
