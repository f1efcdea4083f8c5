"""Test setup: 8 fake CPU devices for mesh tests (set before JAX starts), and one
XLA compilation cache per test run, shared by the xdist workers and the
subprocesses they start: many tests compile the same tiny train and eval steps,
and a program compiled once is then read back instead of compiled again (the
cache is keyed by the program's HLO and the compiler's version and options, so a
test that changes the program gets its own entry)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # the controller makes it; workers inherit
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nl_jax_test_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
