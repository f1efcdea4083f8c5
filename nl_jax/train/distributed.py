"""Multi-process runs: one process per host (TPU pod slices, GPU clusters).

Every host runs the same ``python -m nl_jax train`` command; the processes
join one JAX system (``jax.distributed.initialize``) before any computation,
so ``jax.devices()`` lists the devices of all hosts and the mesh spans them.
Each process reads its own rows of every global batch (``data/pipeline.py``)
and only process 0 writes the workdir's metrics, config and plots (orbax
coordinates the checkpoint writes of all processes; the workdir must be a
path that every host sees).

Flags:
  --distributed            detect the cluster (Cloud TPU VMs, SLURM, Open MPI,
                           Kubernetes; or JAX_COORDINATOR_ADDRESS plus the two
                           flags below)
  --coordinator HOST:PORT  process 0's address, with --num_processes and
  --num_processes N        --process_id: an explicit launch (any machine,
  --process_id I           including several processes on one CPU host)
"""

from __future__ import annotations

import argparse

import jax

from nl_jax.errors import UserError


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The multi-process flags of ``argv``, and the other arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    return parser.parse_known_args(argv)


def requested(flags: argparse.Namespace) -> bool:
    """Whether any multi-process flag was given."""
    return flags.distributed or any(
        x is not None for x in (flags.coordinator, flags.num_processes, flags.process_id))


def initialize(flags: argparse.Namespace) -> None:
    """Joins the processes into one JAX system; a no-op without the flags.

    Must run before anything starts a JAX backend.
    """
    if not requested(flags):
        return
    explicit = (flags.coordinator, flags.num_processes, flags.process_id)
    kwargs = {}
    if any(x is not None for x in explicit):
        if flags.num_processes is None or flags.process_id is None:
            raise UserError("--coordinator, --num_processes and --process_id go together "
                            "(or use --distributed alone to detect the cluster); got "
                            f"--coordinator={flags.coordinator} --num_processes="
                            f"{flags.num_processes} --process_id={flags.process_id}")
        if flags.num_processes < 1 or not 0 <= flags.process_id < flags.num_processes:
            raise UserError(f"--process_id must be in [0, --num_processes), got "
                            f"{flags.process_id} of {flags.num_processes}")
        kwargs = dict(coordinator_address=flags.coordinator,
                      num_processes=flags.num_processes, process_id=flags.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"multi-process start failed ({str(e).rstrip('.')}); --distributed "
                        f"detects Cloud TPU pods, SLURM, Open MPI and Kubernetes jobs, "
                        f"elsewhere give --coordinator HOST:PORT --num_processes N "
                        f"--process_id I to every process") from None


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0)."""
    return jax.process_index() == 0
