"""Test-wide settings: 8 fake CPU devices for sharding tests, float32 matmuls, slow/gpu markers."""
import os


def _xla_flags(flags: str) -> str:
    """XLA_FLAGS with 8 host devices added unless the caller set a count (a user's XLA_FLAGS used to replace it).

    Compilation flags for the suite (LLVM -O0, no persistent cache) are set by scripts/test.sh, which says why."""
    key = "--xla_force_host_platform_device_count"
    return flags.strip() if key in flags else f"{flags.strip()} {key}=8".strip()


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
