"""Pre-flight compile: against a real TPU topology (needs the tpu extra: libtpu)
and against this machine's own devices (``--topology local``)."""

import importlib.util

import pytest

from experiments import base

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def test_preflight_on_local_cpu_mesh_reports_memory_without_allocating():
    from nl_jax.train.aot import preflight
    c = base.get_config()
    c.mesh = dict(data=2, fsdp=2, tensor=2)
    report = preflight(c, "local")
    assert report["chips"] == 8 and report["device_kind"] == "cpu"
    assert report["tokens_per_step"] == c.data.batch_size * c.data.seq_len
    # params + 2 Adam moments in fp32, sharded: at most 3 * 4 bytes * params per device
    assert 0 < report["argument_gib"] <= 3 * 4 * report["params"] / 2**30
    assert report["temp_gib"] > 0 and report["fits"] is None   # no HBM figure for a CPU


@needs_libtpu
def test_preflight_compiles_for_v5p_slice_and_reports_memory():
    from nl_jax.train.aot import preflight
    c = base.get_config()
    c.mesh = dict(data=2, fsdp=2, tensor=1)
    report = preflight(c, "v5p:2x2x1")
    assert report["chips"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # fp32 params + 2 Adam moments, sharded 4 ways (embed over fsdp, batch over data x fsdp)
    assert 0 < report["argument_gib"] < 3 * 4 * report["params"] / 2**30
    assert report["fits"] is True and report["flops_per_chip"] > 0
