"""Configuration and state of an in-context associative memory (a token-clock level).

``MemorySpec`` says what the memory is (map, objective, update rule) and how it is
executed (chunk size, path, remat); ``MemoryState`` is the streaming state that a
caller passes from one segment of a sequence to the next.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from nl_jax.errors import ConfigError

KINDS = ("linear", "mlp")
OBJECTIVES = ("l2", "dot", "huber")
PATHS = ("oracle", "chunked", "kernel", "auto")


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """An associative memory level (Titans section 3, NL Eq. 56-57).

    Attributes:
      kind: ``"linear"`` (a d_v x d_k matrix per head) or ``"mlp"`` (residual MLP
        M(x) = x + W_L act(... act(W_1 x)), requires d_k == d_v).
      objective: ``"l2"`` ||M(k) - v||^2 (Titans Eq. 12), ``"dot"`` -<M(k), v>, or
        ``"huber"`` (elementwise Huber of M(k) - v, delta 1).
      momentum: use the surprise momentum S_t = eta_t S_{t-1} - theta_t u_t
        (Titans Eq. 13); off: S_t = -theta_t u_t and eta is ignored.
      weight_decay: use the forget gate M_t = (1 - alpha_t) M_{t-1} + S_t
        (Titans Eq. 13); off: alpha is ignored.
      dgd: add the delta / DGD rank-one preconditioner (NL Eq. 57) to the step.
      mlp_depth: number of linear layers of the MLP memory.
      mlp_expansion: hidden width of the MLP memory is d_k * mlp_expansion.
      chunk_size: C; all gradients of a chunk are taken at the chunk-start state.
        C = 1 is the exact per-token recurrence.
      path: ``"oracle"`` (per-token lax.scan), ``"chunked"`` (dual form), or
        ``"kernel"`` (the dual form with its recurrence over chunks in the
        Pallas chunk-scan kernels, forward and backward: ``kernels/linear_memory.py``
        for the linear memory with the l2 or dot objective, ``kernels/chunk_scan.py``
        on ``chunked.py``'s chunk step otherwise; Mosaic on TPUs, Triton on CUDA
        GPUs, interpret mode on the CPU), or ``"auto"`` (``kernel`` on a TPU, and
        on a CUDA GPU for the linear memory; ``chunked`` otherwise; resolved
        by ``resolved()`` when a model is built: ``memory/kernel_path.py``).
      remat_every: chunks per rematerialised scan segment on the chunked path
        (the linear fast path processes chunks in blocks of this size); on the
        kernel path, chunks per state saved for the backward kernel (which
        recomputes the others).
      grad_clip: G > 0 bounds each token's step direction, layer by layer:
        u_t (rank one, E_t x_t^T) is scaled by min(1, G / |u_t|_F) before the
        momentum and forgetting gates act.  0 (default): no clipping.  Keeps a
        deep (MLP) memory's inner loop from diverging when its gradients grow
        with its weights.
    """

    kind: str = "linear"
    objective: str = "l2"
    momentum: bool = True
    weight_decay: bool = True
    dgd: bool = False
    mlp_depth: int = 2
    mlp_expansion: int = 2
    chunk_size: int = 64
    path: str = "chunked"
    remat_every: int = 4
    grad_clip: float = 0.0

    def __post_init__(self):
        _choice("kind", self.kind, KINDS)
        _choice("objective", self.objective, OBJECTIVES)
        _choice("path", self.path, PATHS)
        for name in ("momentum", "weight_decay", "dgd"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"memory {name}={getattr(self, name)!r} must be "
                                  "True or False")
        for name in ("mlp_depth", "mlp_expansion", "chunk_size", "remat_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"memory {name}={value!r} must be an integer >= 1")
        clip = self.grad_clip
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0:
            raise ConfigError(f"memory grad_clip={clip!r} must be a number >= 0 (0: no "
                              f"clipping)")

    def resolved(self) -> MemorySpec:
        """This spec with ``path="auto"`` resolved for the target platform."""
        if self.path != "auto":
            return self
        from nl_jax.memory import kernel_path
        gpu_kernel = self.kind == "linear" and self.objective in ("l2", "dot")
        return dataclasses.replace(self, path=kernel_path.resolve(self.path, gpu_kernel))


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"memory {name}={value!r} is not allowed; choose one of "
                          f"{list(allowed)}")


class MemoryState(NamedTuple):
    """Streaming state of a per-token memory (a pytree).

    Attributes:
      params: memory weights, a dict of fp32 leaves ``[B, H, ...]``.
      momentum: the surprise S, same structure as ``params`` (zeros when
        ``spec.momentum`` is off).
    """

    params: Any
    momentum: Any


class OptaxMemoryState(NamedTuple):
    """Streaming state of a memory trained by an optax inner optimizer (a pytree).

    Attributes:
      params: memory weights, a dict of fp32 leaves ``[B, H, ...]``.
      opt_state: the inner optimizer's state, leaves ``[B, H, ...]``.
    """

    params: Any
    opt_state: Any
