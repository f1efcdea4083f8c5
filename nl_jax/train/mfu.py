"""Peak FLOP/s and memory bandwidth per chip, and model FLOPs utilisation (MFU).

``mfu = model_flops_per_token x tokens_per_s / (peak FLOP/s per chip x chips)``,
with the analytic training FLOPs per token of ``nl_jax/models/flops.py`` (3 x
the forward matrix products, the in-context memory updates included; no
recomputation) and the peak of the chip for the model's compute dtype
(``model.dtype``).  Training logs it (``train/loop.py``) and the ``aot``
pre-flight estimates it (``train/aot.py``).

Peaks are the vendors' dense figures (no structured sparsity), looked up by
the exact ``device.device_kind`` string that JAX reports for the chip
(``PEAKS``).  The float32 column is what a float32 matrix product runs at under
JAX's default precision (``jax.lax.Precision.DEFAULT``): one bfloat16 pass on
a TPU (so the bfloat16 peak), TF32 tensor cores on an A100/H100/H200.  A chip
not in the table has no peak: MFU is then not reported.

The CPU has no datasheet figure: its peak is measured once per process
(``measured_cpu_flops``: the best of a few jitted float32 1024 x 1024 matrix
products, well under a second) and counts per host, since the devices of
``--xla_force_host_platform_device_count`` share one host's cores.  On a
machine shared with other work that figure, and so the MFU, moves with the
load.
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple


class ChipPeak(NamedTuple):
    """Datasheet figures of one chip.

    Attributes:
      name: the chip, as its vendor names it.
      bf16_flops: dense bfloat16 FLOP/s.
      fp32_flops: FLOP/s of a float32 matrix product at JAX's default precision.
      hbm_bytes_per_s: HBM bandwidth in bytes/s.
    """

    name: str
    bf16_flops: float
    fp32_flops: float
    hbm_bytes_per_s: float


T, G = 1e12, 1e9
# Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, /v5e,
# /v5p, /v6e), per chip: peak bf16 compute; HBM bandwidth.  A TPU runs a float32
# product in one bf16 pass at the default precision: the fp32 column is the bf16 peak.
_V4 = ChipPeak("TPU v4", 275 * T, 275 * T, 1200 * G)           # 32 GiB HBM2, 1200 GBps
_V5E = ChipPeak("TPU v5e", 197 * T, 197 * T, 819 * G)          # 16 GB HBM2, 819 GBps
_V5P = ChipPeak("TPU v5p", 459 * T, 459 * T, 2765 * G)         # 95 GB HBM2e, 2765 GBps
_V6E = ChipPeak("TPU v6e (Trillium)", 918 * T, 918 * T, 1640 * G)   # 32 GB, 1640 GBps
# NVIDIA datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet; H100: "NVIDIA
# H100 Tensor Core GPU" datasheet; H200: "NVIDIA H200 Tensor Core GPU" datasheet).
# Their BF16 and TF32 tensor-core figures are with 2:4 sparsity ("*"); the dense
# rate is half of it.  TF32 is what JAX's default precision runs float32 products
# at on these GPUs.
_A100 = (312 * T, 156 * T)                    # BF16 624* / 2, TF32 312* / 2 (SXM and PCIe)
_H100_SXM = (1979 / 2 * T, 989 / 2 * T)       # BF16 1979*, TF32 989*
_H100_PCIE = (1513 / 2 * T, 756 / 2 * T)      # BF16 1513*, TF32 756*
_H100_NVL = (1671 / 2 * T, 835 / 2 * T)       # BF16 1671*, TF32 835*

# device.device_kind -> peaks.  TPU kinds as libtpu names them (v5e is
# "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite"; the newer spellings too, as in
# jax/_src/pallas/mosaic/tpu_info.py); "TPU v4 lite" (v4i) is another chip and is
# not listed.  GPU kinds are the CUDA device names.
PEAKS: dict[str, ChipPeak] = {
    "TPU v4": _V4,
    "TPU v5 lite": _V5E, "TPU v5e": _V5E,
    "TPU v5": _V5P, "TPU v5p": _V5P,
    "TPU v6 lite": _V6E, "TPU v6e": _V6E,
    "NVIDIA A100-SXM4-40GB": ChipPeak("NVIDIA A100 40GB SXM", *_A100, 1555 * G),
    "NVIDIA A100-PCIE-40GB": ChipPeak("NVIDIA A100 40GB PCIe", *_A100, 1555 * G),
    "NVIDIA A100-SXM4-80GB": ChipPeak("NVIDIA A100 80GB SXM", *_A100, 2039 * G),
    "NVIDIA A100 80GB PCIe": ChipPeak("NVIDIA A100 80GB PCIe", *_A100, 1935 * G),
    "NVIDIA H100 80GB HBM3": ChipPeak("NVIDIA H100 SXM", *_H100_SXM, 3350 * G),
    "NVIDIA H100 PCIe": ChipPeak("NVIDIA H100 PCIe", *_H100_PCIE, 2000 * G),
    "NVIDIA H100 NVL": ChipPeak("NVIDIA H100 NVL", *_H100_NVL, 3900 * G),
    "NVIDIA H200": ChipPeak("NVIDIA H200 SXM", *_H100_SXM, 4800 * G),   # H100 SXM's compute
    "NVIDIA H200 NVL": ChipPeak("NVIDIA H200 NVL", *_H100_NVL, 4800 * G),
}

CPU_MATMUL_SIZE = 1024


def chip_peak(device_kind: str) -> ChipPeak | None:
    """The table's entry for ``device_kind`` (exact, surrounding spaces ignored)."""
    return PEAKS.get(device_kind.strip())


@functools.lru_cache(maxsize=1)
def measured_cpu_flops() -> float:
    """This host's dense float32 FLOP/s: the fastest of a few jitted
    ``CPU_MATMUL_SIZE``-square matrix products on the first CPU device (measured
    once per process, in well under a second)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = CPU_MATMUL_SIZE
    device = jax.devices("cpu")[0]
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), device)
    product = jax.jit(jnp.matmul)
    product(x, x).block_until_ready()           # compile and warm up
    best, spent = float("inf"), 0.0
    for _ in range(8):
        start = time.perf_counter()
        product(x, x).block_until_ready()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > 0.3:
            break
    return 2.0 * n ** 3 / best


class DevicePeak(NamedTuple):
    """The peak of a set of devices for one compute dtype.

    Attributes:
      flops_per_chip: peak FLOP/s of one chip (on a CPU: one host).
      chips: chips counted (a CPU's devices: its hosts, i.e. processes).
      hbm_bytes_per_s: memory bandwidth per chip (None: not known, e.g. a CPU).
      source: where the figure comes from, for the logs.
    """

    flops_per_chip: float
    chips: int
    hbm_bytes_per_s: float | None
    source: str

    @property
    def flops(self) -> float:
        """Peak FLOP/s of all the chips together."""
        return self.flops_per_chip * self.chips


def device_peak(devices, dtype: str) -> DevicePeak | None:
    """The peak of ``devices`` (all of one kind) for compute dtype ``dtype``
    (``"bfloat16"`` or ``"float32"``); None for a device kind with no known peak.

    CPU devices: the measured rate of this host (``measured_cpu_flops``) times
    the number of processes they belong to.
    """
    devices = list(devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        hosts = len({d.process_index for d in devices})
        return DevicePeak(measured_cpu_flops(), hosts, None,
                          f"measured float32 {CPU_MATMUL_SIZE}^2 matmul on this host, "
                          f"x {hosts} host{'s' if hosts > 1 else ''}")
    peak = chip_peak(kind)
    if peak is None:
        return None
    flops = peak.bf16_flops if dtype == "bfloat16" else peak.fp32_flops
    precision = "bf16" if dtype == "bfloat16" else "fp32 at JAX's default precision"
    return DevicePeak(flops, len(devices), peak.hbm_bytes_per_s,
                      f"{peak.name} datasheet, dense {precision}, x {len(devices)} chips")


def unknown_peak_note(kind: str) -> str:
    """Why MFU is not reported for ``kind``."""
    return (f"no peak FLOP/s is known for device kind {kind!r}, so no MFU is reported "
            f"(nl_jax/train/mfu.py PEAKS lists the known chips)")


def mfu(flops_per_token: float, tokens_per_s: float, peak: DevicePeak) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    return flops_per_token * tokens_per_s / peak.flops


def utilisation(tokens_per_s: float, flops_per_token: float | None,
                peak: DevicePeak | None) -> dict[str, float]:
    """The log keys of one record: ``model_flops_per_token`` (when known) and
    ``mfu`` (when the peak is known too)."""
    if flops_per_token is None:
        return {}
    out = {"model_flops_per_token": flops_per_token}
    if peak is not None:
        out["mfu"] = mfu(flops_per_token, tokens_per_s, peak)
    return out
