"""The commands' persistent compilation cache (configurable_fm/cli/__init__.py: set_up_compilation_cache): where it
goes, how it is turned off, and that a command's compiled programs land there."""
import os
import subprocess
import sys

from configurable_fm.cli import compilation_cache_dir


def test_where_the_cache_goes(tmp_path):
    assert compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/x"}) is None  # jax's own setting wins
    for off in ("off", "OFF", "0", "false", "no"):
        assert compilation_cache_dir({"CFM_COMPILATION_CACHE": off}) is None
    assert compilation_cache_dir({"CFM_COMPILATION_CACHE": str(tmp_path)}) == str(tmp_path)
    assert compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == os.path.join("/c", "configurable_fm", "jax")
    assert compilation_cache_dir({}).endswith(os.path.join(".cache", "configurable_fm", "jax"))


def test_a_command_fills_the_cache(tmp_path):
    """In a fresh process (the cache is process-wide jax state): a jitted program compiled after the set-up is
    written to the directory; an unmakeable directory turns the cache off instead of failing."""
    code = ("import sys, jax, jax.numpy as jnp\n"
            "from configurable_fm.cli import set_up_compilation_cache\n"
            "print(set_up_compilation_cache({'CFM_COMPILATION_CACHE': sys.argv[1]}))\n"
            "jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()\n")
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-c", code, str(cache)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache) and any(cache.iterdir())
    (tmp_path / "file").write_text("")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "file" / "sub")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "None", out.stderr
