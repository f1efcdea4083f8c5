"""An nl_jax model as an lm-evaluation-harness language model (no harness import here).

``NLJaxLM`` implements the harness's three request types on strings;
``nl_jax.lm_eval`` registers it with the harness (as ``nl_jax``), and
``nl_jax eval --tasks`` calls it directly through ``nl_jax.eval.tasks``.
Requests may be the harness's ``Instance`` objects (their ``.args``) or plain
argument tuples.

Tokenization follows the harness's Hugging Face model: a context's trailing
whitespace moves to the continuation, the continuation's tokens are those of
``encode(context + continuation)`` after ``encode(context)``'s, and an empty
context (and every rolling text) is conditioned on the eos token.
"""

from __future__ import annotations

from collections.abc import Sequence

from nl_jax.eval.generate import NextTokenLogits
from nl_jax.eval.scoring import Scorer


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


class NLJaxLM:
    """``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` of an
    nl_jax model; ``max_len`` is the window (the run's ``data.seq_len``)."""

    def __init__(self, model_def, params, tokenizer, *, max_len: int,
                 batch_size: int | None = None, buckets: Sequence[int] | None = None,
                 stream: bool | None = None):
        self.model_def, self.params, self.tokenizer = model_def, params, tokenizer
        self.max_len = int(max_len)
        self.scorer = Scorer(model_def, params, max_len=max_len, stream=stream,
                             buckets=buckets, batch_size=batch_size)
        self.eos_id = int(tokenizer.eos_id)
        self._next_run = None

    # -- tokenization ----------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.eos_id], list(self.tokenizer.encode(continuation))
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = list(self.tokenizer.encode(context + continuation))
        ctx = list(self.tokenizer.encode(context))
        return ctx, whole[len(ctx):]

    # -- the harness's request types -----------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*_args(r)[:2]) for r in requests]
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_tokens(self, pairs) -> list[tuple[float, bool]]:
        """Token-level ``loglikelihood``: ``[(context_ids, continuation_ids)]``; an
        empty continuation scores 0 (and is greedy)."""
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        scored = self.scorer.score([pairs[i] for i in todo])
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)
        for i, res in zip(todo, scored, strict=True):
            out[i] = res
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        texts = [list(self.tokenizer.encode(_args(r)[0])) for r in requests]
        nonempty = [i for i, t in enumerate(texts) if t]
        sums = self.scorer.rolling([texts[i] for i in nonempty], self.eos_id)
        out = [0.0] * len(texts)
        for i, s in zip(nonempty, sums, strict=True):
            out[i] = s
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation, cut at the first of ``until`` (default: the eos
        token's text) or after ``max_gen_toks`` tokens (default 256)."""
        outputs = []
        for request in requests:
            context, kwargs = _args(request)[:2]
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or [self.tokenizer.decode([self.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            budget = int(kwargs.get("max_gen_toks", 256))
            ids = list(self.tokenizer.encode(context)) or [self.eos_id]
            start = len(ids)
            next_logits = NextTokenLogits(self.model_def, self.params, max_len=self.max_len,
                                          stream=self.scorer.stream)
            if self._next_run is None:
                self._next_run = next_logits._run
            next_logits._run = self._next_run       # one compile for all requests
            text = ""
            for _ in range(budget):
                ids.append(int(next_logits(ids).argmax()))
                if ids[-1] == self.eos_id:
                    ids.pop()
                    break
                text = self.tokenizer.decode(ids[start:])
                if any(stop in text for stop in until):
                    break
            text = self.tokenizer.decode(ids[start:])
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def from_workdir(workdir: str, argv: Sequence[str] = (), *, command: str = "eval",
                 batch_size: int | None = None):
    """(``NLJaxLM`` of a workdir's latest checkpoint, its config, its step).
    ``argv``: ``--config FILE`` / ``--config.KEY=VALUE`` overrides, as ``eval``."""
    from nl_jax.__main__ import _load_run, _restored_trainer
    from nl_jax.errors import UserError
    config, workdir, rest = _load_run(["--workdir", workdir, *argv], command)
    if rest:
        raise UserError(f"{command}: unknown arguments {rest}")
    with config.unlocked():
        config.train.eval_batches = 0         # no held-out loss: no eval files needed
    trainer = _restored_trainer(config, workdir, command)
    lm = NLJaxLM(trainer.model_def, trainer.state["params"], trainer.tokenizer,
                 max_len=config.data.seq_len, batch_size=batch_size)
    return lm, config, int(trainer.state["step"])
