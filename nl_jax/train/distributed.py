"""Multi-process runs (TPU pod slices, GPU clusters).

Every process runs the same ``python -m nl_jax train`` command; the processes
join one JAX system (``jax.distributed.initialize``) before any computation,
so ``jax.devices()`` lists the devices of all hosts and the mesh spans them.
Each process reads its own rows of every global batch (``data/pipeline.py``)
and only process 0 writes the workdir's metrics, config and plots (orbax
coordinates the checkpoint writes of all processes; the workdir must be a
path that every host sees).  Ctrl-C or SIGTERM on any process is acted on
when all processes have agreed on it (``agreed_max`` at logging steps), so
they save the same step together.

Flags:
  --distributed            detect the cluster: Cloud TPU pod slices (one
                           process per host), SLURM or Open MPI jobs (one
                           process per task, JAX gives each its local GPU)
  --coordinator HOST:PORT  process 0's address, with --num_processes and
  --num_processes N        --process_id: an explicit launch (any machine,
  --process_id I           including several processes on one CPU host)
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from nl_jax.errors import UserError


def split_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The multi-process flags of ``argv`` (numbers checked by ``initialize``), and
    the other arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--distributed", action="store_true")
    parser.add_argument("--coordinator")
    parser.add_argument("--num_processes")
    parser.add_argument("--process_id")
    return parser.parse_known_args(argv)


def requested(flags: argparse.Namespace) -> bool:
    """Whether any multi-process flag was given."""
    return flags.distributed or any(
        x is not None for x in (flags.coordinator, flags.num_processes, flags.process_id))


def _explicit_launch(flags: argparse.Namespace) -> dict:
    """``jax.distributed.initialize`` arguments from the three explicit flags."""
    given = f"--coordinator={flags.coordinator} --num_processes={flags.num_processes} " \
            f"--process_id={flags.process_id}"
    if None in (flags.coordinator, flags.num_processes, flags.process_id):
        raise UserError(f"--coordinator, --num_processes and --process_id go together (or "
                        f"use --distributed alone to detect the cluster); got {given}")
    host, _, port = flags.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator must be HOST:PORT (process 0's address and a free "
                        f"port), got {flags.coordinator!r}")
    try:
        num_processes, process_id = int(flags.num_processes), int(flags.process_id)
    except ValueError:
        raise UserError(f"--num_processes and --process_id must be integers; got {given}"
                        ) from None
    if num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in [0, --num_processes), got {process_id} "
                        f"of {num_processes}")
    return dict(coordinator_address=flags.coordinator, num_processes=num_processes,
                process_id=process_id, cluster_detection_method="deactivate")


def initialize(flags: argparse.Namespace) -> None:
    """Joins the processes into one JAX system; a no-op without the flags.

    Must run before anything starts a JAX backend.  The explicit flags turn
    JAX's cluster detection off (under SLURM it would otherwise restrict each
    process to one local GPU).
    """
    if not requested(flags):
        return
    explicit = (flags.coordinator, flags.num_processes, flags.process_id)
    kwargs = _explicit_launch(flags) if any(x is not None for x in explicit) else {}
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"multi-process start failed ({str(e).rstrip('.')}); --distributed "
                        f"detects Cloud TPU pods and SLURM or Open MPI jobs, elsewhere "
                        f"give --coordinator HOST:PORT --num_processes N --process_id I "
                        f"to every process") from None


def agreed_max(value: int) -> int:
    """The largest ``value`` over all processes (a collective: every process must
    call it at the same point of the program)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0)."""
    return jax.process_index() == 0
