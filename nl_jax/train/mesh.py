"""Device mesh from config and shardings from logical axis names."""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nl_jax.config import resolve_mesh_shape
from nl_jax.errors import ConfigError
from nl_jax.sharding import fit_divisible_only, logical_to_mesh_spec


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A mesh with the config's axes (``data``, ``fsdp``, ``tensor``, ...).

    Axes are ``Auto`` (GSPMD propagation from the in/out shardings and
    ``with_sharding_constraint``), not the explicit-sharding default of
    ``jax.make_mesh``.
    """
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(tuple(shape.values()), tuple(shape.keys()),
                         axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def param_shardings(abstract_params: nnx.State, mesh: Mesh, rules) -> Any:
    """NamedShardings for a (pure-dict) param tree, from ``sharding_names``."""
    def to_sharding(leaf):
        names = getattr(leaf, "out_sharding", None)
        if names is None:
            names = getattr(leaf, "sharding_names", None)
        if not names:
            return NamedSharding(mesh, P())
        spec = logical_to_mesh_spec(names, rules, mesh.axis_names)
        return NamedSharding(mesh, fit_divisible_only(spec, names, leaf.shape, mesh.shape))

    shardings = jax.tree.map(to_sharding, abstract_params,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    check_divisible(abstract_params, shardings, mesh)
    return shardings


def check_divisible(abstract_params, shardings, mesh: Mesh) -> None:
    """Every sharded parameter dimension divides by the size of its mesh axes;
    a ConfigError names the parameter, the dimension and the way out."""
    from nl_jax.levels import param_paths

    for name, leaf, sharding in zip(param_paths(abstract_params),
                                    jax.tree.leaves(abstract_params),
                                    jax.tree.leaves(shardings), strict=True):
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(mesh.shape[a] for a in axes)
            if size % parts:
                raise ConfigError(
                    f"parameter {name} of shape {tuple(leaf.shape)} cannot be sharded: its "
                    f"dimension {dim} ({size}) is split over mesh axes {list(axes)} of total "
                    f"size {parts}, which does not divide it; pick mesh sizes that divide "
                    f"the model dimensions (e.g. mesh.tensor dividing model.n_heads) or map "
                    f"that logical axis to no mesh axis in sharding.rules")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(("batch", "length"), rules, mesh.axis_names))


def check_process_rows(sharding: NamedSharding, batch_size: int, seq_len: int, devices,
                       process_index: int, process_count: int) -> None:
    """Checks that ``devices`` (one process's) hold exactly its rows of the batch.

    The data pipeline gives process p the rows ``p*B/P : (p+1)*B/P``; the batch
    sharding must place those rows, and only those, on p's devices.  It does
    not when the batch is split over fewer mesh slices than there are
    processes (e.g. a tensor-parallel axis spanning hosts).
    """
    local = batch_size // process_count
    want = set(range(process_index * local, (process_index + 1) * local))
    index_map = sharding.devices_indices_map((batch_size, seq_len))
    held: set[int] = set()
    for device in devices:
        held.update(range(*index_map[device][0].indices(batch_size)))
    if held != want:
        got = f"{min(held)}:{max(held) + 1}" if held else "none"
        raise ConfigError(
            f"mesh {dict(sharding.mesh.shape)} over {process_count} processes: process "
            f"{process_index}'s devices hold batch rows {got}, but its data is rows "
            f"{min(want)}:{max(want) + 1}; the batch axes (mesh.data * mesh.fsdp) must be "
            f"split across processes: make them a multiple of the process count and keep "
            f"mesh.tensor within one host")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
