"""Logical axis names -> mesh axes (MaxText style).

Every parameter carries a tuple of logical axis names (``("embed", "mlp")``)
in its ``sharding_names`` metadata, and activations are annotated with
``constrain(x, ("batch", "length", "embed"))``.  A list of rules maps each
logical name to a mesh axis (or a tuple of mesh axes, or ``None`` for
replicated).  Rules come from the config (``config.sharding.rules``); the
trainer installs them with ``use_rules(mesh, rules)``.  Outside that context
``constrain`` is a no-op, so models run unchanged on one device and in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Any]]

_CONTEXT: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = (
    contextvars.ContextVar("nl_jax_sharding", default=None))


def logical_to_mesh_spec(axes: Sequence[str | None] | None, rules: Rules,
                         mesh_axes: Sequence[str] = ()) -> P:
    """Maps a tuple of logical axis names to a PartitionSpec.

    The first rule that names a logical axis wins.  A mesh axis is used at most
    once per spec (later dimensions that map to an already used mesh axis are
    replicated), and mesh axes of size 1 are kept: they cost nothing.
    """
    if axes is None:
        return P()
    table: dict[str, Any] = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        targets = (target,) if isinstance(target, str) else tuple(target)
        targets = tuple(t for t in targets if t not in used
                        and (not mesh_axes or t in mesh_axes))
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return P(*out)


@contextlib.contextmanager
def use_rules(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Makes ``constrain`` active for code traced inside this context."""
    token = _CONTEXT.set((mesh, tuple((n, t) for n, t in rules)))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def per_example_rules() -> Iterator[str | tuple[str, ...] | None]:
    """For code ``vmap``-ped over the batch: yields the mesh axes of the logical
    ``batch`` axis (pass them as ``vmap``'s ``spmd_axis_name``, which shards the
    mapped axis over them) and, inside, makes the rules use those axes for
    nothing else (the per-example code sees a batch of one).  Yields None and
    changes nothing without active rules."""
    ctx = _CONTEXT.get()
    if ctx is None:
        yield None
        return
    mesh, rules = ctx
    spec = logical_to_mesh_spec(("batch",), rules, mesh.axis_names)[0]
    taken = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)

    def without(target):
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(t for t in targets if t not in taken)
        return kept[0] if len(kept) == 1 else (kept or None)

    inner = tuple((name, None if name == "batch" else without(target))
                  for name, target in rules)
    token = _CONTEXT.set((mesh, inner))
    try:
        yield spec
    finally:
        _CONTEXT.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Annotates an activation with logical axes (no-op without rules)."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    spec = logical_to_mesh_spec(axes, rules, mesh.axis_names)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# Logical axes split only over the mesh axes that divide the dimension (the
# rest replicated) instead of a config error: a memory's per-head dimensions
# (64 or 96) are smaller than the fsdp sizes of large pods.
DIVISIBLE_ONLY = frozenset({"memory_state"})


def memory_state_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a memory's initial state M_0 (an outer-level parameter of
    shape ``[heads, ..., last]``): heads, then ``memory_state`` on the last
    dimension, which the rules map to ``fsdp`` so M_0 and its optimizer state are
    stored sharded like every other weight (``gather_memory_state`` at use)
    where fsdp divides that dimension (``DIVISIBLE_ONLY``)."""
    return ("memory_heads",) + (None,) * (ndim - 2) + ("memory_state",) if ndim > 1 else (
        "memory_heads",)


def gather_memory_state(w: jax.Array) -> jax.Array:
    """M_0 whole on each device (but still split over heads) before it is
    broadcast over the batch: the FSDP all-gather at use (its gradient is a
    reduce-scatter)."""
    return constrain(w, ("memory_heads",) + (None,) * (w.ndim - 1))


def dividing_prefix(target, size: int, mesh_shape) -> str | tuple[str, ...] | None:
    """The longest prefix of the mesh axes ``target`` (a PartitionSpec entry) whose
    product divides ``size``, as a PartitionSpec entry."""
    names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    kept: tuple[str, ...] = ()
    for name in names:
        if size % (math.prod(mesh_shape[n] for n in kept) * mesh_shape[name]):
            break
        kept += (name,)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def fit_divisible_only(spec: P, names: Sequence[str | None], shape: Sequence[int],
                       mesh_shape) -> P:
    """``spec`` with the dimensions named in ``DIVISIBLE_ONLY`` cut to the mesh axes
    that divide them."""
    return P(*(dividing_prefix(target, size, mesh_shape) if name in DIVISIBLE_ONLY
               else target for target, name, size in zip(spec, names, shape, strict=True)))


def local_mesh_axes(axes: Sequence[str | None], shape: Sequence[int]
                    ) -> tuple[jax.sharding.Mesh, P] | None:
    """(mesh, spec) to run per-shard code (``jax.shard_map``) over dimensions named
    ``axes``: the rules' spec, each dimension keeping the longest prefix of its
    mesh axes whose product divides its size (the rest replicated).  None without
    rules (``use_rules``) or on a one-device mesh."""
    ctx = _CONTEXT.get()
    if ctx is None or ctx[0].size == 1:
        return None
    mesh, rules = ctx
    return mesh, P(*(dividing_prefix(target, size, mesh.shape) for target, size in zip(
        logical_to_mesh_spec(axes, rules, mesh.axis_names), shape, strict=True)))
