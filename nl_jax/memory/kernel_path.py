"""What every level's ``path="kernel"`` shares: the backend check and the placement of
the chunk-scan kernels (``kernels/chunk_scan.py``) on a mesh."""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from nl_jax.errors import ConfigError
from nl_jax.sharding import local_mesh_axes


def require_backend(key: str, interpret: bool | None) -> None:
    """ConfigError naming ``key`` when this backend has no kernel body (Mosaic: TPU,
    Triton: CUDA GPU, interpret mode: CPU) and ``interpret`` does not force one."""
    from nl_jax_kernels.chunk_scan import BACKENDS

    backend = jax.default_backend()
    if interpret is None and backend not in BACKENDS:
        raise ConfigError(f"{key}='kernel' runs on TPUs (Mosaic) and CUDA GPUs (Triton), "
                          f"not on {backend}; use path='chunked' (e.g. "
                          f"--config.{key}=chunked)")


def on_local_shards(run, states, xs):
    """``run(states, xs) -> (ys, final states)`` on each device's own (batch, head)
    pairs: states ``[B, H, ...]``, inputs and outputs chunk-major ``[N, B, H, ...]``.
    The pairs are independent and XLA cannot partition a Pallas call, so on a
    mesh the kernels run under ``jax.shard_map`` with the batch and heads split
    as the sharding rules say (``local_mesh_axes``); without rules or on one
    device, ``run`` as is."""
    b, h = jax.tree.leaves(states)[0].shape[:2]
    placement = local_mesh_axes(("batch", "heads"), (b, h))
    if placement is None:
        return run(states, xs)
    mesh, (rows, heads) = placement
    chunks, per_head = P(None, rows, heads), P(rows, heads)
    return jax.shard_map(run, mesh=mesh, in_specs=(per_head, chunks),
                         out_specs=(chunks, per_head), check_vma=False)(states, xs)
