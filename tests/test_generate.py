"""Sampling: the per-token logits of `NextTokenLogits` against one pass over the text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import base
from experiments.hope import tiny as hope_tiny
from experiments.titans import tiny as titans_tiny
from nl_jax.eval.generate import NextTokenLogits, generate
from nl_jax.models.lm import streams_exactly
from nl_jax.train.state import ModelDef, build_model

MAX_LEN, T = 8, 29


def model_config(family):
    if family.startswith("titans"):
        c = titans_tiny.get_config().model
        c.mixer = family
        c.memory.update(chunk_size=4, segment_len=8, window=6)
    elif family.startswith("hope"):
        c = hope_tiny.get_config().model
        c.self_modifying.update(chunk_size=8, memory_chunk_size=4)
        c.cms.periods = (4, "never")
        if family == "hope_attention":
            c.mixer = "attention"
    else:
        c = base.get_config().model
    c.update(vocab_size=64, d_model=32, n_heads=2, n_layers=1, d_ff=64)
    return c


def model(family):
    graphdef, params, rest = nnx.split(build_model(model_config(family), 0), nnx.Param, ...)
    return ModelDef(graphdef, rest), params


def tokens():
    return [int(t) for t in jax.random.randint(jax.random.key(3), (T,), 0, 64)]


def one_pass(model_def, params, ids):
    return model_def.bind(params)(jnp.asarray([ids], jnp.int32))[0][0]


@pytest.mark.parametrize("family, expected", [
    ("transformer", False), ("hope_attention", False), ("titans_mag", True),
    ("titans_mac", True), ("hope", True)])
def test_which_models_stream_exactly(family, expected):
    model_def, params = model(family)
    assert streams_exactly(model_def.bind(params)) is expected


@pytest.mark.parametrize("family", ["titans_mag", "titans_mac", "hope"])
def test_streamed_logits_equal_one_pass_over_the_whole_text(family):
    """A text 3.6x the window: each next-token logit equals one pass over the whole
    prefix (the memory carries the text across segments); a sliding window loses
    what fell out of it."""
    model_def, params = model(family)
    ids = tokens()
    full = one_pass(model_def, params, ids)
    streamed = NextTokenLogits(model_def, params, max_len=MAX_LEN)
    window = NextTokenLogits(model_def, params, max_len=MAX_LEN, stream=False)
    assert streamed.stream and not window.stream
    lost = 0.0
    for p in range(1, T + 1):
        np.testing.assert_allclose(streamed(ids[:p]), full[p - 1], atol=1e-4,
                                   err_msg=f"position {p - 1}")
        lost = max(lost, float(jnp.max(jnp.abs(window(ids[:p]) - full[p - 1]))))
    assert lost > 1e-3


def test_attention_models_slide_a_window():
    model_def, params = model("transformer")
    ids = tokens()
    next_logits = NextTokenLogits(model_def, params, max_len=MAX_LEN)
    assert not next_logits.stream
    for p in (3, MAX_LEN, T):
        np.testing.assert_allclose(
            next_logits(ids[:p]), one_pass(model_def, params, ids[max(0, p - MAX_LEN):p])[-1],
            atol=1e-5)


def test_greedy_generation_follows_the_one_pass_argmax():
    class Ids:      # a tokenizer of space-separated ids
        eos_id = 0

        def encode(self, text):
            return [int(t) for t in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    model_def, params = model("titans_mag")
    prompt = tokens()[:11]            # longer than one segment
    text = generate(model_def, params, Ids(), prompt=" ".join(map(str, prompt)),
                    num_tokens=15, max_len=MAX_LEN, temperature=0.0)
    ids = Ids().encode(text)
    assert ids[:11] == prompt and len(ids) == 26
    full = one_pass(model_def, params, ids)
    assert ids[11:] == [int(jnp.argmax(full[p - 1])) for p in range(11, 26)]


def test_the_text_must_grow_and_a_repeated_call_repeats_the_logits():
    model_def, params = model("titans_mag")
    ids = tokens()
    next_logits = NextTokenLogits(model_def, params, max_len=MAX_LEN)
    at_boundary = next_logits(ids[:MAX_LEN])          # a whole segment: folded in
    np.testing.assert_array_equal(next_logits(ids[:MAX_LEN]), at_boundary)
    with pytest.raises(ValueError, match="do not extend"):
        next_logits(ids[1:MAX_LEN + 2])
    with pytest.raises(ValueError, match="at least one token"):
        NextTokenLogits(model_def, params, max_len=MAX_LEN)([])


def test_a_cms_level_as_slow_as_the_window_keeps_the_sliding_window():
    """Period 8 = max_len: in training the level fires at the sequence's end, after
    every output; streaming would let its update act, so the default is the window."""
    c = model_config("hope")
    c.cms.periods = (8, "never")
    graphdef, params, rest = nnx.split(build_model(c, 0), nnx.Param, ...)
    model_def = ModelDef(graphdef, rest)
    assert streams_exactly(model_def.bind(params))
    assert not NextTokenLogits(model_def, params, max_len=8).stream
    assert NextTokenLogits(model_def, params, max_len=16).stream
    assert NextTokenLogits(model_def, params, max_len=8, stream=True).stream
