"""What every level's ``path="kernel"`` shares: the backend check, the placement of
the chunk-scan kernels (``kernels/chunk_scan.py``) on a mesh, and ``path="auto"``.

``auto`` picks, for the platform the program is built for, the path that runs
the level fastest there: the kernels on a TPU (Mosaic), on a CUDA GPU the
kernels where the level has a Triton body (the Titans linear memory) and the
XLA chunked path otherwise, and the XLA chunked path on the CPU (where the
kernels only run in Pallas interpret mode).  The platform is the one of the
devices the train program is built for (``target_platform``, set by
``train.aot.train_program``: an ahead-of-time compile for a TPU topology from a
CPU host gets the kernels), else JAX's default backend.  Both paths compute the
same function, so ``auto`` never changes results beyond float rounding.
"""

from __future__ import annotations

import contextlib
import contextvars

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


_PLATFORM: contextvars.ContextVar[tuple[str | None, bool]] = contextvars.ContextVar(
    "nl_jax_target_platform", default=(None, True))


@contextlib.contextmanager
def target_platform(platform: str | None, kernels: bool = True):
    """Resolve ``path="auto"`` for ``platform`` (``"tpu"``, ``"gpu"``/``"cuda"``,
    ``"cpu"``) while models are built inside this context; ``kernels=False``
    resolves it to the XLA path everywhere (the teach signal differentiates the
    levels twice, and the kernels' custom VJPs have no second derivative)."""
    token = _PLATFORM.set((platform, kernels))
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def resolve(path: str, gpu_kernel: bool) -> str:
    """``path``, with ``"auto"`` resolved (module docstring); ``gpu_kernel``: whether
    the level has a Triton body (its kernel path is faster than XLA on a GPU)."""
    if path != "auto":
        return path
    platform, kernels = _PLATFORM.get()
    platform = platform or jax.default_backend()
    if not kernels:
        return "chunked"
    if platform == "tpu" or (platform in ("gpu", "cuda") and gpu_kernel):
        return "kernel"
    return "chunked"
