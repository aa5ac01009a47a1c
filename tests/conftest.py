"""Test setup: 8 simulated CPU devices (set before jax is imported), fp32 matmuls at full precision, and a
persistent compilation cache so repeated runs of the suite skip most XLA compiles."""

import os

# appended, not set by default: a caller's own XLA_FLAGS (dump options, ...) must not cost the 8 devices
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
_cache_dir = os.environ.get("HDFLASH_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache_dir))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ---- the sandbox tests' mechanisms ---------------------------------------------------------------------------

import functools  # noqa: E402

import pytest  # noqa: E402

from eval import sandbox as _sandbox  # noqa: E402 — stdlib only (≈ 50 ms)


@functools.cache
def sandbox_why_not(mechanism):
    """None when `mechanism` isolates on this machine, else the reason (probed once per process)."""
    return _sandbox.probe(mechanism)


@pytest.fixture(params=_sandbox.MECHANISMS)
def mech(request):
    """Each sandbox mechanism this machine can use; the others skip with their reason."""
    why = sandbox_why_not(request.param)
    if why is not None:
        pytest.skip(f"{request.param} does not isolate here: {why}")
    return request.param


# a program that forks 64 sleeping children: the sandbox's process cap must stop it (both sandbox test files)
FORK_BOMB = """\
import os, sys, time
n = 0
try:
    for _ in range(64):
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
finally:
    print(f"forked {n}", file=sys.stderr)
"""
