"""In-context associative memories (token-clock levels): Titans / DGD rules.

Three execution paths with the same semantics (``MemorySpec.path``): the
oracle per-token scan, the chunked dual form, and (linear memory) the chunked
dual form with its chunk recurrence in a Pallas kernel (TPU or GPU)
(``kernels/linear_memory.py``); ``apply_memory_optax`` trains the
memory with any optax inner optimizer once per chunk.
"""

from nl_jax.memory.api import apply_memory, init_memory_params, initial_state
from nl_jax.memory.optax_memory import apply_memory_optax, initial_optax_state
from nl_jax.memory.spec import MemorySpec, MemoryState, OptaxMemoryState

__all__ = ["MemorySpec", "MemoryState", "OptaxMemoryState", "apply_memory",
           "apply_memory_optax", "init_memory_params", "initial_optax_state",
           "initial_state"]
