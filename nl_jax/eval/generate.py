"""Text sampling from a trained LM (full forward per token, fixed length)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def generate(model_def, params, tokenizer, *, prompt: str, num_tokens: int,
             max_len: int, temperature: float = 0.8, seed: int = 0) -> str:
    """Samples ``num_tokens`` after ``prompt``; returns prompt + continuation.

    The model runs on a fixed ``[1, max_len]`` window (compiled once); the
    window slides when the text grows longer.  Causality makes the padding
    after the current position irrelevant.
    """
    ids = list(tokenizer.encode(prompt))
    start = 0 if ids else 1      # an empty prompt: start after an end-of-text token
    ids = ids or [tokenizer.eos_id]

    @jax.jit
    def next_logits(params, window, pos):
        logits, _ = model_def.bind(params)(window)
        return jax.lax.dynamic_index_in_dim(logits[0], pos, keepdims=False)

    key = jax.random.key(seed)
    for _ in range(num_tokens):
        ctx = ids[-max_len:]
        window = np.zeros((1, max_len), np.int32)
        window[0, :len(ctx)] = ctx
        logits = next_logits(params, jnp.asarray(window), len(ctx) - 1)
        key, sub = jax.random.split(key)
        if temperature > 0:
            tok = int(jax.random.categorical(sub, logits / temperature))
        else:
            tok = int(jnp.argmax(logits))
        ids.append(tok)
    return tokenizer.decode(ids[start:])
