"""Text sampling from a trained LM (one fixed-shape forward per token)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nl_jax.models.lm import slowest_in_context_period, streams_exactly


class NextTokenLogits:
    """Logits of the next token of one growing text: each call's ids extend the
    previous call's.  The model runs on a fixed ``[1, max_len]`` window
    (causality makes the padding after the text irrelevant): one forward per new
    token, compiled once (twice when streaming: without and with a state).

    ``stream`` (default: the model ``streams_exactly``, i.e. Titans and Hope, and
    has no in-context CMS level whose period is ``max_len`` or more): the text is cut into
    segments of ``max_len`` tokens; the window holds the current segment and
    starts from the model's state after all earlier ones, so the memory carries
    the whole text, however long, and the logits are those of one pass over it.
    Otherwise (attention models, which keep no cache) the window slides over the
    last ``max_len`` tokens.  A CMS level whose period is the training context
    or longer never changed an output in training (it fires at a sequence's end
    at the earliest); streaming would let its updates act, so such models slide
    the window unless ``stream=True``.
    """

    def __init__(self, model_def, params, *, max_len: int, stream: bool | None = None):
        self.params, self.max_len = params, max_len
        if stream is None:
            model = model_def.bind(params)
            stream = streams_exactly(model) and slowest_in_context_period(model) < max_len
        self.stream = stream
        self.state, self.segment_start = None, 0   # ids[:segment_start] are in state
        self._ids: list[int] = []
        self._logits = None

        @jax.jit
        def run(params, window, pos, state):
            logits, state = model_def.bind(params)(window, state)
            return jax.lax.dynamic_index_in_dim(logits[0], pos, keepdims=False), state

        self._run = run

    def _window(self, tokens: Sequence[int]) -> jax.Array:
        window = np.zeros((1, self.max_len), np.int32)
        window[0, :len(tokens)] = tokens
        return jnp.asarray(window)

    def __call__(self, ids: Sequence[int]) -> jax.Array:
        ids = list(ids)
        if not ids:
            raise ValueError("NextTokenLogits needs at least one token (e.g. the eos id)")
        if ids[:len(self._ids)] != self._ids:
            raise ValueError("NextTokenLogits follows one growing text: these ids do not "
                             "extend the previous call's; make a new one for another text")
        if len(ids) == len(self._ids):
            return self._logits
        self._ids, self._logits = ids, self._next(ids)
        return self._logits

    def _next(self, ids: list[int]) -> jax.Array:
        if not self.stream:
            ctx = list(ids[-self.max_len:])
            return self._run(self.params, self._window(ctx), len(ctx) - 1, None)[0]
        while len(ids) - self.segment_start > self.max_len:   # whole segments not yet in
            start = self.segment_start
            _, self.state = self._run(self.params, self._window(ids[start:start + self.max_len]),
                                      0, self.state)
            self.segment_start += self.max_len
        ctx = list(ids[self.segment_start:])
        logits, after = self._run(self.params, self._window(ctx), len(ctx) - 1, self.state)
        if len(ctx) == self.max_len:   # a whole segment (no padding): its state is exact
            self.state, self.segment_start = after, self.segment_start + self.max_len
        return logits


def generate(model_def, params, tokenizer, *, prompt: str, num_tokens: int,
             max_len: int, temperature: float = 0.8, seed: int = 0,
             stream: bool | None = None) -> str:
    """Samples ``num_tokens`` after ``prompt`` (``temperature`` 0: greedy); returns
    prompt + continuation.  ``stream``: see ``NextTokenLogits``."""
    ids = list(tokenizer.encode(prompt))
    start = 0 if ids else 1      # an empty prompt: start after an end-of-text token
    ids = ids or [tokenizer.eos_id]
    next_logits = NextTokenLogits(model_def, params, max_len=max_len, stream=stream)
    key = jax.random.key(seed)
    for _ in range(num_tokens):
        logits = next_logits(ids)
        key, sub = jax.random.split(key)
        if temperature > 0:
            tok = int(jax.random.categorical(sub, logits / temperature))
        else:
            tok = int(jnp.argmax(logits))
        ids.append(tok)
    return tokenizer.decode(ids[start:])
