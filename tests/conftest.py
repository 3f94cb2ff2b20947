"""Test-wide settings: 8 fake CPU devices for sharding tests, XLA's CPU code generated at LLVM -O0, float32
matmuls, slow/gpu markers."""
import os


def _xla_flags(flags: str) -> str:
    """XLA_FLAGS with the suite's two defaults added where the caller did not set them: 8 host devices, and LLVM
    optimisation level 0 for the CPU backend. The suite's programs are tiny, so compilation dominates; -O0 does not
    change the arithmetic (IEEE either way, no fast math; every bitwise test passes with it) and cut the whole
    suite's summed test time by ~20 % (tests/ops/merge/test_chunked.py alone: 113 -> 80 s on 2 cores)."""
    defaults = {"--xla_force_host_platform_device_count": "8", "--xla_backend_optimization_level": "0"}
    extra = [f"{k}={v}" for k, v in defaults.items() if k not in flags]
    return " ".join([flags.strip(), *extra]).strip()


os.environ["XLA_FLAGS"] = _xla_flags(os.environ.get("XLA_FLAGS", ""))  # subprocesses and notebooks inherit it
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CFM_COMPILATION_CACHE", "off")  # commands run in-process: no cache in ~/.cache

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("CFM_RUN_SLOW") == "1"
    has_gpu = any(d.platform == "gpu" for d in jax.devices()) if "cpu" not in os.environ["JAX_PLATFORMS"] else False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: use --runslow or CFM_RUN_SLOW=1"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a GPU"))
