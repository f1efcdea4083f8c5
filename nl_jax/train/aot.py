"""Pre-flight: compile the real pod job on this machine, before paying for the pod.

``python -m nl_jax aot --config experiments/hope/760m.py --topology v5p:4x4x8``
describes a TPU slice with libtpu (``pip install -e '.[tpu]'``), builds the
mesh over its devices, derives the sharded train state abstractly (nothing is
allocated), lowers and compiles the jitted train step for it and reports the
per-chip memory from XLA's memory analysis against the chip's HBM.
``--topology local`` compiles for this machine's own devices instead (a GPU,
or the CPU with ``--xla_force_host_platform_device_count``): the same report
without libtpu.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from nl_jax import config as config_lib
from nl_jax.errors import UserError

# HBM per chip in GiB, by device_kind prefix.
HBM_GIB = {"NVIDIA H100": 80, "NVIDIA H200": 141, "TPU v4": 32, "TPU v5 lite": 16,
           "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95, "TPU v6 lite": 32, "TPU v6e": 32}


def usable_hbm_gib(device, local: bool) -> float | None:
    """Memory a step may use on ``device``, in GiB (None: unknown, e.g. a CPU).

    A local accelerator reports its allocator limit (``memory_stats``; on a GPU
    that is XLA_PYTHON_CLIENT_MEM_FRACTION, 75% by default, of the HBM).
    Otherwise the nominal HBM of the device kind, and 75% of it for a GPU.
    """
    if local:
        stats = getattr(device, "memory_stats", lambda: None)()
        if stats and stats.get("bytes_limit"):
            return stats["bytes_limit"] / 2**30
    kind = device.device_kind
    hbm = next((v for k, v in sorted(HBM_GIB.items(), key=lambda kv: -len(kv[0]))
                if kind.startswith(k)), None)
    if hbm is not None and kind.startswith("NVIDIA"):
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))
        return hbm * fraction
    return hbm


def topology_devices(topology: str):
    if topology == "local":
        return jax.devices()
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:
        raise UserError(f"aot: cannot describe TPU topology {topology!r} ({e}). Install "
                        f"the TPU extra (pip install -e '.[tpu]') and give a name like "
                        f"v5p:2x2x1 or v5e:4x4") from None
    return topo.devices


class TrainProgram(NamedTuple):
    """A config's jitted train and eval steps on a mesh, without data: the one
    builder that ``train``, ``eval``/``generate`` (through the trainer) and the
    ``aot`` pre-flight all use, so the pre-flight compiles what training runs.

    Attributes:
      mesh: the config's mesh over the given devices.
      rules: the logical-axis rules (``config.sharding.rules``).
      model_def: the model's graph and non-parameter variables.
      abstract_params: the parameters' shapes (``nnx.State`` of ShapeDtypeStructs).
      abstract_state: the train state's ShapeDtypeStructs, with their shardings.
      shardings: the train state's shardings (a tree like the state).
      batch_sharding: the sharding of a ``[batch, seq_len]`` token array.
      optimizer: the nested levels as one optax transform.
      loss: the teach-signal loss, or None (the LM loss).
      teach_paths: the weight arrays the teach signal updates in context.
      step: ``jax.jit`` of ``make_train_step`` (levels, frozen mask, teach
        signal), in/out shardings set, the state donated.
      eval_step: ``jax.jit`` of ``make_eval_step`` on the parameters.
      init: allocates the initial state on the mesh (None for an abstract
        program, e.g. devices of a TPU topology description).
    """

    mesh: Any
    rules: tuple
    model_def: Any
    abstract_params: Any
    abstract_state: dict
    shardings: Any
    batch_sharding: Any
    optimizer: Any
    loss: Any
    teach_paths: list
    step: Any
    eval_step: Any
    init: Callable[[], dict] | None


def train_program(config, devices, allocate: bool = False) -> TrainProgram:
    """The train step of ``config`` on ``devices`` (``config`` validated for them).

    ``allocate``: also build ``init`` (and the model's non-parameter variables
    on the devices); otherwise nothing is executed.
    """
    from nl_jax import levels as levels_lib
    from nl_jax.train import teach as teach_lib
    from nl_jax.train.checkpoint import abstract_with_shardings
    from nl_jax.train.mesh import batch_sharding, make_mesh, replicated
    from nl_jax.train.state import (
        abstract_model,
        prepare_train_state,
        train_state_shardings,
    )
    from nl_jax.train.step import make_eval_step, make_train_step

    mesh = make_mesh(config.mesh, devices)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    _, abstract_params = abstract_model(config.model, config.train.seed)
    optimizer = levels_lib.build_levels(config.levels, abstract_params,
                                        total_steps=config.train.steps,
                                        grad_clip_norm=float(config.train.grad_clip_norm))
    init = None
    if allocate:
        model_def, abstract_state, shardings, init = prepare_train_state(
            config.model, optimizer, config.train.seed, mesh, rules)
    else:
        model_def, abstract_state, shardings, _ = train_state_shardings(
            config.model, optimizer, config.train.seed, mesh, rules)
    b_shard = batch_sharding(mesh, rules)
    frozen = levels_lib.frozen_mask(config.levels, abstract_params)
    teach_paths, loss = [], None
    if teach_lib.enabled(config):     # checked (one error line) before the loss is built
        teach_paths = teach_lib.check(config, model_def.bind(abstract_params), abstract_params)
        loss = teach_lib.make_teach_loss(model_def, config, abstract_params)
    step = jax.jit(make_train_step(model_def, optimizer, mesh, rules, levels_lib.level_metrics,
                                   frozen, loss=loss),
                   in_shardings=(shardings, b_shard),
                   out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model_def, mesh, rules, loss),
                        in_shardings=(shardings["params"], b_shard))
    return TrainProgram(mesh, rules, model_def, abstract_params,
                        abstract_with_shardings(abstract_state, shardings), shardings, b_shard,
                        optimizer, loss, teach_paths, step, eval_step, init)


def abstract_batch(config, program: TrainProgram) -> dict:
    """ShapeDtypeStructs of one global batch, sharded as the step expects."""
    shape = (config.data.batch_size, config.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, np.int32, sharding=program.batch_sharding)
            for k in ("inputs", "targets")}


def step_bytes(memory_analysis) -> int:
    """Device memory of a compiled step: arguments + outputs + temporaries - the
    aliased (donated) buffers, from its ``memory_analysis()``."""
    m = memory_analysis
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def preflight(config, topology: str) -> dict[str, Any]:
    devices = topology_devices(topology)
    config_lib.validate(config, len(devices))
    program = train_program(config, devices)
    shape = (config.data.batch_size, config.data.seq_len)
    compiled = program.step.lower(program.abstract_state,
                                  abstract_batch(config, program)).compile()
    mem = compiled.memory_analysis()
    kind = devices[0].device_kind
    hbm = usable_hbm_gib(devices[0], local=topology == "local")

    def gib(n_bytes):
        return n_bytes / 2**30

    per_chip = gib(step_bytes(mem))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(program.abstract_params)))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return {"topology": topology, "device_kind": kind, "chips": len(devices),
            "mesh": dict(program.mesh.shape), "params": n_params,
            "tokens_per_step": shape[0] * shape[1],
            "argument_gib": gib(mem.argument_size_in_bytes),
            "temp_gib": gib(mem.temp_size_in_bytes),
            "output_gib": gib(mem.output_size_in_bytes),
            "per_chip_gib": per_chip, "usable_hbm_gib": hbm,
            "fits": None if hbm is None else per_chip <= hbm,
            "flops_per_chip": float(cost.get("flops", 0.0))}


def main(argv: list[str]) -> int:
    config, rest = config_lib.load(argv)
    parser = argparse.ArgumentParser(prog="nl_jax aot")
    parser.add_argument("--topology", required=True,
                        help="e.g. v5p:4x4x8 or v5e:4x4; local: the devices of this machine")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(rest)
    report = preflight(config, args.topology)
    for k, v in report.items():
        print(f"{k:>16}: {v:.3f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if report["fits"] is False:
        print(f"does NOT fit: {report['per_chip_gib']:.1f} GiB per chip > "
              f"{report['usable_hbm_gib']:.1f} GiB usable HBM")
        return 1
    return 0
