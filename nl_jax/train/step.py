"""The jitted, pure-functional train and eval steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nl_jax.sharding import use_rules


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, token count) in fp32."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets)
    return jnp.sum(losses), jnp.asarray(losses.size, jnp.float32)


def forward_loss(model_def) -> Callable[[Any, dict], jax.Array]:
    """``loss(params, batch)``: the mean token loss of one forward pass."""

    def loss(params, batch):
        logits, _ = model_def.bind(params)(batch["inputs"])
        total, count = cross_entropy(logits, batch["targets"])
        return total / count

    return loss


def make_train_step(model_def, optimizer: optax.GradientTransformation, mesh, rules,
                    level_metrics: Callable[[Any], dict] | None = None, frozen=None,
                    loss: Callable[[Any, dict], jax.Array] | None = None):
    """``state, metrics = step(state, batch)``: one optimizer step.

    ``frozen`` (from ``levels.frozen_mask``) marks parameters whose gradients
    are not needed.  ``loss`` (default ``forward_loss``) maps (params, batch) to
    the mean token loss, e.g. ``teach.make_teach_loss``.  Not yet jitted: the
    caller jits with in/out shardings and donation.
    """
    loss = loss or forward_loss(model_def)

    def loss_fn(params, batch):
        if frozen is not None:  # frozen levels: no weight gradients computed
            params = jax.tree.map(
                lambda f, sub: jax.tree.map(jax.lax.stop_gradient, sub) if f else sub,
                frozen, params)
        return loss(params, batch)

    def step(state, batch):
        with use_rules(mesh, rules):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "update_norm": optax.tree.norm(updates)}
        if level_metrics is not None:
            metrics.update(level_metrics(opt_state))
        new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    return step


def make_eval_step(model_def, mesh, rules, loss: Callable[[Any, dict], jax.Array] | None = None):
    """``(loss_sum, token_count) = eval_step(params, batch)``; ``loss`` as in
    ``make_train_step`` (a mean, scaled back to a sum)."""

    def eval_step(params, batch):
        with use_rules(mesh, rules):
            if loss is not None:
                count = jnp.asarray(batch["targets"].size, jnp.float32)
                return loss(params, batch) * count, count
            logits, _ = model_def.bind(params)(batch["inputs"])
        return cross_entropy(logits, batch["targets"])

    return eval_step
