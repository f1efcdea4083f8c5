"""Pre-flight: compile the real pod job on this machine, before paying for the pod.

``python -m nl_jax aot --config experiments/hope/760m.py --topology v5p:4x4x8``
describes a TPU slice with libtpu (``pip install -e '.[tpu]'``), builds the
mesh over its devices, derives the sharded train state abstractly (nothing is
allocated), lowers and compiles the jitted train step for it and reports the
per-chip memory from XLA's memory analysis against the chip's HBM.
``--topology local`` compiles for this machine's own devices instead (a GPU,
or the CPU with ``--xla_force_host_platform_device_count``): the same report
without libtpu.

It also estimates the step time and MFU (``estimate``), a roofline: the
analytic model FLOPs of a step (``nl_jax/models/flops.py``) against the chips'
peak for ``model.dtype`` (``train/mfu.py``: the datasheet table, or this
host's measured rate for a CPU), and the bytes the compiled step accesses per
chip (XLA's ``cost_analysis()``) against the chip's HBM bandwidth; the step
takes at least the longer of the two.  The bytes that the step's collectives
(all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute)
return per chip are read from the compiled program and reported, not timed
(no interconnect model).  XLA counts a loop body once, in its cost analysis
and here: for models that scan (the in-context memories' chunk scans) the
bytes are lower bounds, the analytic FLOPs are not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from nl_jax import config as config_lib
from nl_jax.errors import UserError
from nl_jax.train import mfu as mfu_lib

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
    on the devices); otherwise nothing is executed.  The model is built for
    the devices' platform: a token-clock level with ``path="auto"`` gets the
    path that platform runs fastest (``memory/kernel_path.py``), so the
    pre-flight of a TPU topology from a CPU host compiles the TPU kernels.
    """
    from nl_jax.memory.kernel_path import target_platform
    from nl_jax.train import teach as teach_lib

    platform = np.asarray(devices, dtype=object).flat[0].platform
    with target_platform(platform, kernels=not teach_lib.enabled(config)):
        return _build_program(config, devices, allocate)


def _build_program(config, devices, allocate: bool) -> TrainProgram:
    """``train_program`` inside its platform context."""
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


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")
# "%name = TYPE opcode(" of an HLO instruction; the type may be a tuple with spaces.
_COLLECTIVE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.*?)\s"
                         r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(?P<dtype>pred|[subfc]\d+|bf16|f8\w*|f4\w*)\[(?P<dims>[\d,]*)\]")


def _dtype_bytes(dtype: str) -> float:
    if dtype == "pred":
        return 1
    bits = re.match(r"[a-z]+(\d+)", dtype)
    return int(bits.group(1)) / 8 if bits else 0


def collective_bytes(hlo_text: str) -> tuple[int, dict[str, int]]:
    """(bytes, ``{op: count}``) of the collectives of a compiled (per-device) HLO
    module: the sum of what each one returns.  An async ``*-start`` returns its
    operands and outputs (and scalar contexts): its outputs, the second half of
    its arrays, are counted; ``*-done`` is not counted again.  Each instruction
    counts once, also inside a loop body."""
    total, counts = 0.0, {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.match(line)
        if not match:
            continue
        arrays = [(a["dtype"], [int(x) for x in a["dims"].split(",") if x])
                  for a in _ARRAY.finditer(match["type"])]
        if match["start"]:
            arrays = [(t, dims) for t, dims in arrays if dims or t not in ("u32", "s32")]
            if match["op"] != "all-reduce":      # all-reduce-start returns its outputs only
                arrays = arrays[len(arrays) // 2:]
        total += sum(_dtype_bytes(t) * float(np.prod(dims)) for t, dims in arrays)
        counts[match["op"]] = counts.get(match["op"], 0) + 1
    return int(total), counts


def estimate(config, devices, cost: dict, hlo_text: str | None) -> dict[str, Any]:
    """The roofline estimate of one step (module docstring) of ``config`` on
    ``devices``, from the compiled step's ``cost`` analysis and HLO text (None:
    not available).  Times in seconds; None where a figure is not known."""
    from nl_jax.models.flops import model_flops_per_token
    flops_per_token = model_flops_per_token(config)
    tokens = config.data.batch_size * config.data.seq_len
    flops_per_step = flops_per_token * tokens
    kind = devices[0].device_kind
    peak = mfu_lib.device_peak(devices, config.model.dtype)
    accessed = cost.get("bytes accessed")
    accessed = float(accessed) if accessed is not None else None
    if hlo_text is None:
        coll_bytes, note = None, "XLA reports no program text: collective bytes unknown"
    else:
        coll_bytes, counts = collective_bytes(hlo_text)
        note = (", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) if counts
                else "none in the compiled program")
    out = {"model_flops_per_token": flops_per_token, "model_flops_per_step": flops_per_step,
           "peak_flops_per_chip": None, "peak_flops": None,
           "peak_source": mfu_lib.unknown_peak_note(kind), "hbm_bytes_per_s": None,
           "bytes_accessed_per_chip": accessed, "collective_bytes_per_chip": coll_bytes,
           "collectives": note, "compute_s": None, "memory_s": None, "est_step_s": None,
           "est_mfu": None, "est_tokens_per_s": None, "bound": None}
    if peak is None:
        return out
    compute_s = flops_per_step / peak.flops
    memory_s = (accessed / peak.hbm_bytes_per_s
                if peak.hbm_bytes_per_s and accessed is not None else None)
    step_s = max(compute_s, memory_s or 0.0)
    if memory_s is None:
        bound = (f"compute (no HBM bandwidth known for {kind})" if accessed is not None
                 else "compute (XLA reports no bytes accessed)")
    else:
        bound = "compute" if compute_s >= memory_s else "memory"
    out.update(peak_flops_per_chip=peak.flops_per_chip, peak_flops=peak.flops,
               peak_source=peak.source, hbm_bytes_per_s=peak.hbm_bytes_per_s,
               compute_s=compute_s, memory_s=memory_s, est_step_s=step_s,
               est_mfu=mfu_lib.mfu(flops_per_token, tokens / step_s, peak),
               est_tokens_per_s=tokens / step_s, bound=bound)
    return out


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
    try:
        hlo_text = compiled.as_text()
    except Exception:     # a backend that cannot print its executable
        hlo_text = None
    report = {"topology": topology, "device_kind": kind, "chips": len(devices),
              "mesh": dict(program.mesh.shape), "params": n_params,
              "tokens_per_step": shape[0] * shape[1],
              "argument_gib": gib(mem.argument_size_in_bytes),
              "temp_gib": gib(mem.temp_size_in_bytes),
              "output_gib": gib(mem.output_size_in_bytes),
              "per_chip_gib": per_chip, "usable_hbm_gib": hbm,
              "fits": None if hbm is None else per_chip <= hbm,
              "flops_per_chip": float(cost.get("flops", 0.0))}
    report.update(estimate(config, devices, cost, hlo_text))
    return report


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if value and not 1e-2 <= abs(value) < 1e5 else f"{value:.3f}"
    return str(value)


def main(argv: list[str]) -> int:
    config, rest = config_lib.load(argv)
    parser = argparse.ArgumentParser(prog="nl_jax aot")
    parser.add_argument("--topology", required=True,
                        help="e.g. v5p:4x4x8 or v5e:4x4; local: the devices of this machine")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(rest)
    report = preflight(config, args.topology)
    width = max(map(len, report))
    for k, v in report.items():
        print(f"{k:>{width}}: {_shown(v)}")
    if report["est_step_s"] is not None:
        print(f"estimated step: {report['est_step_s']:.4g} s ({report['bound']} bound), "
              f"MFU {report['est_mfu']:.3f}, {report['est_tokens_per_s']:.4g} tokens/s "
              f"(roofline: model FLOPs vs peak, bytes accessed vs HBM bandwidth; "
              f"collectives not timed)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if report["fits"] is False:
        print(f"does NOT fit: {report['per_chip_gib']:.1f} GiB per chip > "
              f"{report['usable_hbm_gib']:.1f} GiB usable HBM")
        return 1
    return 0
