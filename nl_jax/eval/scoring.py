"""Log-likelihood of token continuations, batched (the engine of ``nl_jax.eval.harness``).

A request is ``(context_ids, continuation_ids)`` with at least one context token
(an empty text's context is the eos id); the answer is ``(sum of the
continuation's token log-probabilities, whether greedy decoding reproduces it)``.

Batching.  Requests are sorted by length and batched by the window they need:
``len(context) + len(continuation) - 1`` input tokens, RIGHT-padded to the
smallest of a few bucketed window lengths (one compile per bucket, plus one per
bucket with a carried state).  Right padding never changes a real token's
logits (the models are causal); left padding would, for Titans and Hope, write
the pad tokens into the memory before the text.

Long inputs.  Models that stream exactly (Titans, Hope: see ``NextTokenLogits``)
read an input longer than ``max_len`` segment by segment, the memory carried
from one window to the next, so the log-probabilities are those of one pass
over the whole input; every segment but a row's last is full (no padding), so
the carried state is exact.  Attention models keep no cache: their inputs are
cut to the last ``max_len`` tokens (what the harness's Hugging Face model does);
a continuation longer than the window is scored in pieces of ``max_len`` tokens,
each read with the ``max_len`` tokens before it, which for ``rolling`` are the
harness's disjoint rolling windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nl_jax.models.lm import slowest_in_context_period, streams_exactly

# Bytes of logits (and their log-softmax) one batch may hold: picks the rows per
# batch of each window length unless ``batch_size`` is given.
LOGITS_BUDGET_BYTES = 2 ** 29
MAX_ROWS = 64


def default_buckets(max_len: int, count: int = 4, smallest: int = 64) -> tuple[int, ...]:
    """``max_len``, ``max_len/2``, ... (``count`` lengths, none below ``smallest``)."""
    out, length = [max_len], max_len
    while len(out) < count and length // 2 >= smallest:
        length //= 2
        out.append(length)
    return tuple(sorted(out))


class Scorer:
    """``score(requests)`` -> ``[(log-likelihood, is_greedy)]``; see the module doc.

    ``stream``: None picks as ``NextTokenLogits`` does (True for Titans and Hope).
    ``buckets``: the window lengths inputs are padded to (default
    ``default_buckets(max_len)``); ``max_len`` is always one of them.
    ``batch_size``: rows per batch (default: as many as ``LOGITS_BUDGET_BYTES``
    of logits allow, at most ``MAX_ROWS``, a power of two).
    """

    def __init__(self, model_def, params, *, max_len: int, stream: bool | None = None,
                 buckets: Sequence[int] | None = None, batch_size: int | None = None):
        self.params, self.max_len = params, int(max_len)
        model = model_def.bind(params)
        if stream is None:
            stream = streams_exactly(model) and slowest_in_context_period(model) < max_len
        self.stream = bool(stream)
        self.vocab_size = int(model.embed.shape[0])
        buckets = sorted({int(b) for b in (buckets or default_buckets(max_len))} | {max_len})
        if buckets[0] < 1 or buckets[-1] > max_len:
            raise ValueError(f"buckets must lie in [1, {max_len}], got {buckets}")
        self.buckets = tuple(buckets)
        self.batch_size = batch_size
        self.compiled_shapes: set[tuple[int, int, bool]] = set()   # (rows, window, state)

        @jax.jit
        def run(params, window, targets, mask, state):
            logits, state = model_def.bind(params)(window, state)
            logits = logits.astype(jnp.float32)
            logp = jax.nn.log_softmax(logits, axis=-1)
            token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            misses = mask & (jnp.argmax(logits, axis=-1) != targets)
            return (jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1),
                    jnp.sum(misses, axis=-1), state)

        self._run = run

    def rows_for(self, window: int) -> int:
        if self.batch_size:
            return int(self.batch_size)
        fit = LOGITS_BUDGET_BYTES // (8 * window * self.vocab_size)
        rows = 1
        while rows * 2 <= min(fit, MAX_ROWS):
            rows *= 2
        return rows

    def _layout(self, context: Sequence[int], continuation: Sequence[int]):
        """(input ids, target ids, number of scored positions at the end)."""
        if not context:
            raise ValueError("a request needs at least one context token (e.g. the eos id)")
        if not continuation:
            raise ValueError("a request needs at least one continuation token")
        ids = list(context) + list(continuation)
        inputs, targets = ids[:-1], ids[1:]
        if not self.stream and len(inputs) > self.max_len:
            inputs, targets = inputs[-self.max_len:], targets[-self.max_len:]
        return inputs, targets, len(continuation)

    def _window_for(self, length: int) -> int:
        if length > self.max_len:
            return self.max_len
        return next(b for b in self.buckets if b >= length)

    def score(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
              ) -> list[tuple[float, bool]]:
        pieces, owner = [], []
        for i, (context, continuation) in enumerate(requests):
            ids = list(context) + list(continuation)
            if self.stream or len(ids) - 1 <= self.max_len:
                pieces.append((context, continuation))
                owner.append(i)
                continue
            # A window that cannot hold it all: the continuation in pieces of at most
            # max_len tokens, each read with the max_len tokens before its last.
            for start in range(len(context), len(ids), self.max_len):
                pieces.append((ids[:start], ids[start:start + self.max_len]))
                owner.append(i)
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        for i, (ll, g) in zip(owner, self._score(pieces), strict=True):
            totals[i] += ll
            greedy[i] = greedy[i] and g
        return list(zip(totals, greedy, strict=True))

    def _score(self, requests) -> list[tuple[float, bool]]:
        laid = [self._layout(c, x) for c, x in requests]
        order = sorted(range(len(laid)), key=lambda i: -len(laid[i][0]))
        groups: dict[tuple[int, int], list[int]] = {}
        for i in order:
            n = len(laid[i][0])
            segments = -(-n // self.max_len)
            groups.setdefault((segments, self._window_for(n)), []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(laid)
        for (segments, window), members in groups.items():
            rows = self.rows_for(window)
            for start in range(0, len(members), rows):
                batch = members[start:start + rows]
                for i, out in zip(batch, self._score_batch([laid[i] for i in batch], rows,
                                                           window, segments), strict=True):
                    results[i] = out
        return results

    def _score_batch(self, laid, rows: int, window: int, segments: int):
        width = segments * window
        inputs = np.zeros((rows, width), np.int32)     # right padding
        targets = np.zeros((rows, width), np.int32)
        mask = np.zeros((rows, width), bool)
        for r, (inp, tgt, scored) in enumerate(laid):
            inputs[r, :len(inp)] = inp
            targets[r, :len(tgt)] = tgt
            mask[r, len(inp) - scored:len(inp)] = True
        total = np.zeros(rows, np.float64)
        misses = np.zeros(rows, np.int64)
        state = None
        for s in range(segments):
            cut = slice(s * window, (s + 1) * window)
            if not mask[:, s * window:].any():
                break
            self.compiled_shapes.add((rows, window, state is not None))
            ll, miss, state = self._run(self.params, jnp.asarray(inputs[:, cut]),
                                        jnp.asarray(targets[:, cut]), jnp.asarray(mask[:, cut]),
                                        state)
            total += np.asarray(ll, np.float64)
            misses += np.asarray(miss)
            if not self.stream:
                break
        return [(float(total[r]), bool(misses[r] == 0)) for r in range(len(laid))]

    def rolling(self, texts: Sequence[Sequence[int]], prefix: int) -> list[float]:
        """Log-likelihood of whole token sequences, each conditioned on ``prefix``.
        Without streaming these are the harness's disjoint rolling windows
        (``get_rolling_token_windows`` with ``context_len=1``): every token is
        predicted once, from the window of ``max_len`` tokens that ends before it."""
        return [ll for ll, _ in self.score([([prefix], list(t)) for t in texts])]
