"""The task-loss teach signal: fast weights updated in context by the LM loss.

NL section 4 leaves open the objective of an in-context level (docs/equations.md
section 4, "open point"); the CMS levels use the L2 associative objective
(``nl_jax/models/cms.py``).  This module offers the other choice: a set of
weights selected by ``teach_signal.params`` (e.g. a frozen CMS level) becomes
an in-context level whose objective is the language-modelling loss itself.
A sequence of T tokens is read in segments of P tokens; segment i uses the
fast weights theta_i and, once its labels are known, they take one gradient
step on that segment's loss (Eq. 71 with the task loss as l):

    L_i = mean_{t in segment i} CE(logits_t(theta_i), x_{t+1})
    theta_{i+1} = theta_i - s_i * lr * grad_theta L_i(theta_i)

with s_i the trust ratio of ``memory.cms.bounded_update`` (``max_update``; 0: plain
SGD).  theta_0 are the outer-level weights; the outer loss is mean_i L_i and
its gradient flows through every inner step (second order).  Soundness:

* causal: the labels of segment i are tokens up to the first of segment i+1,
  so theta_{i+1} depends on nothing after what segment i+1 reads; no output
  depends on its own label;
* exact: grad L_i is the true gradient through every layer, so the whole model
  runs segment by segment, passing its stream state on; this needs mixers
  that stream exactly (Hope, Titans; not attention, which keeps no cache);
* per sequence: each sequence of the batch adapts its own copy of the fast
  weights (``vmap`` over the batch), so no sequence learns from another.

Eval uses the same loss (test-time adaptation on every held-out sequence);
``generate`` runs the plain forward pass.  Costs: P-token segments run one
after the other, each with a forward and backward pass of the whole model
inside the outer backward (Hope tiny on the CPU: ~5x the step time and step
memory of the plain loss); memory holds the fast weights once per sequence.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nl_jax import config as config_lib
from nl_jax import levels as levels_lib
from nl_jax.errors import ConfigError
from nl_jax.memory.cms import bounded_update
from nl_jax.models import lm as lm_lib
from nl_jax.sharding import per_example_rules
from nl_jax.train.step import cross_entropy


def enabled(config) -> bool:
    teach = config.get("teach_signal")
    return teach is not None and bool(teach.params)


def _in_context_prefixes(model) -> list[str]:
    """Parameter-path prefixes of the CMS levels updated in context: their
    weights come from the stream state after their first chunk."""
    return [f"blocks/{b}/mlp/levels/{i}/" for b, block in enumerate(model.blocks)
            for i, level in enumerate(getattr(block.mlp, "levels", ()))
            if getattr(level, "in_context", False)]


def _initial_state_paths(params) -> set[str]:
    """Paths of the memories' initial states M_0 (logical axis ``memory_state``)."""
    names = [getattr(v, "out_sharding", None) or getattr(v, "sharding_names", None) or ()
             for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    return {p for p, n in zip(levels_lib.param_paths(params), names, strict=True)
            if "memory_state" in n}


def check(config, model, params) -> list[str]:
    """Validates ``config.teach_signal`` against the model; the fast parameter paths."""
    teach, seq_len = config.teach_signal, config.data.seq_len
    segment = teach.segment
    if not (isinstance(segment, int) and 0 < segment < seq_len and seq_len % segment == 0):
        raise ConfigError(f"teach_signal.segment must divide data.seq_len={seq_len} and be "
                          f"smaller (at least two segments), got {segment!r}")
    for key, v in config_lib.seq_len_divisors(config):
        if segment % v:
            raise ConfigError(
                f"teach_signal.segment={segment} must be a multiple of {key}={v}: the "
                f"stream state holds the tokens of an unfinished chunk, whose shape must be "
                f"the same after every segment")
    for level in ("memory", "self_modifying"):       # ('auto' resolves to chunked here)
        options = config.model.get(level)
        if options is not None and options.get("path") == "kernel":
            raise ConfigError(f"teach_signal differentiates the memory twice, and "
                              f"model.{level}.path='kernel' (Pallas kernels with a custom "
                              f"VJP) has no second derivative: use "
                              f"--config.model.{level}.path=chunked (or auto)")
    for key in ("lr", "max_update"):
        v = teach[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"teach_signal.{key} must be a number >= 0, got {v!r}")
    if not lm_lib.streams_exactly(model):
        raise ConfigError(
            f"teach_signal needs a model that streams exactly segment by segment (mixers "
            f"and channel mixers carrying their past in the state: Hope, Titans); "
            f"model.mixer={config.model.mixer!r} with model.mlp={config.model.mlp!r} does "
            f"not (attention keeps no cache): set teach_signal.params='' or change model")
    try:
        pattern = re.compile(teach.params)
    except re.error as e:
        raise ConfigError(f"teach_signal.params={teach.params!r} is not a regex: {e}") from e
    paths = [p for p in levels_lib.param_paths(params) if pattern.fullmatch(p)]
    if not paths:
        raise ConfigError(f"teach_signal.params={teach.params!r} matches no parameter; "
                          f"paths look like 'blocks/0/mlp/levels/1/down/kernel'")
    prefixes = tuple(_in_context_prefixes(model))
    in_context = [p for p in paths if p.startswith(prefixes)]
    initial_states = _initial_state_paths(params)
    initial = [p for p in paths if p in initial_states]
    if initial:
        raise ConfigError(
            f"teach_signal.params={teach.params!r} selects initial states of in-context "
            f"memories ({initial[:3]}...): they are read at a sequence's first token only "
            f"and carried in the stream state after it, so a teach signal on them would act "
            f"on the first segment only; narrow the regex (e.g. exclude '.*/memories/.*')")
    if in_context:
        raise ConfigError(
            f"teach_signal.params={teach.params!r} selects weights of CMS levels updated in "
            f"context ({in_context[:3]}...): they are read from the stream state after the "
            f"first chunk, so a teach signal on them would act on the first segment only; "
            f"select frozen ('never') levels or other weights")
    return paths


def make_teach_loss(model_def, config, params) -> Callable[[Any, dict], jax.Array]:
    """``loss(params, batch)``: the mean token loss with the teach signal (module doc).

    ``params`` (arrays or ShapeDtypeStructs) gives the tree's structure and paths.
    """
    segment_losses = make_segment_losses(model_def, config, params)
    return lambda params, batch: jnp.mean(segment_losses(params, batch))


def make_segment_losses(model_def, config, params) -> Callable[[Any, dict], jax.Array]:
    """``segment_losses(params, batch)``: ``[B, T / P]``, the mean loss of every
    segment of every sequence, each read with the fast weights adapted on the
    segments before it."""
    fast_paths = set(check(config, model_def.bind(params), params))
    teach = config.teach_signal
    # one path per parameter array, in jax.tree.leaves order
    flags = [p in fast_paths for p in levels_lib.param_paths(params)]
    segment, lr, max_update = teach.segment, float(teach.lr), float(teach.max_update)

    def split(tree):
        leaves, treedef = jax.tree.flatten(tree)
        fast = [x for x, f in zip(leaves, flags, strict=True) if f]
        slow = [x for x, f in zip(leaves, flags, strict=True) if not f]
        return fast, slow, treedef

    def join(fast, slow, treedef):
        fast, slow = iter(fast), iter(slow)
        return treedef.unflatten([next(fast) if f else next(slow) for f in flags])

    def segment_losses(params, batch):
        fast0, slow, treedef = split(params)

        def segment_loss(fast, tokens, targets, stream):
            """Mean loss of one segment of one sequence ([P] tokens), and the state."""
            model = model_def.bind(join(fast, slow, treedef))
            logits, stream = model(tokens[None], stream)
            total, count = cross_entropy(logits, targets[None])
            return total / count, stream

        def step(fast, tokens, targets, stream):
            (value, stream), grad = jax.value_and_grad(segment_loss, has_aux=True)(
                fast, tokens, targets, stream)
            # theta - s * lr * grad, s the trust ratio per weight (leading axis: one sequence)
            fast = [w[0] for w in bounded_update([w[None] for w in fast],
                                                 [lr * g[None] for g in grad], max_update)]
            return fast, stream, value

        def one_sequence(tokens, targets):
            n = tokens.shape[0] // segment
            tok = tokens.reshape(n, segment)
            tgt = targets.reshape(n, segment)
            fast, stream, first = step(fast0, tok[0], tgt[0], None)

            @jax.checkpoint
            def body(carry, xs):
                fast, stream = carry
                fast, stream, value = step(fast, *xs, stream)
                return (fast, stream), value

            # segments 1 .. n-2 update the weights; the last one only reads them
            (fast, stream), middle = jax.lax.scan(body, (fast, stream),
                                                  (tok[1:-1], tgt[1:-1]))
            last, _ = segment_loss(fast, tok[-1], tgt[-1], stream)
            return jnp.concatenate([first[None], middle, last[None]])

        with per_example_rules() as batch_axes:
            return jax.vmap(one_sequence, spmd_axis_name=batch_axes)(batch["inputs"],
                                                                     batch["targets"])

    return segment_losses
