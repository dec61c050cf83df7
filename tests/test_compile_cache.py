"""The persistent compilation cache: where it lives, switching it, damaged entries, a restart that compiles nothing."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import startup
from gcp_jax import compile_cache


@pytest.fixture
def session_cache():
    """Whatever a test switches to, this process goes back to the session's cache (tests/conftest.py)."""
    yield os.environ["JAX_COMPILATION_CACHE_DIR"]
    compile_cache.enable(os.environ["JAX_COMPILATION_CACHE_DIR"])


def entries(directory) -> set[str]:
    return {name for name in os.listdir(directory) if name.endswith("-cache")}


def test_default_dir_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == str(tmp_path / "gcp_jax" / "xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.default_dir() == str(tmp_path / "home" / ".cache" / "gcp_jax" / "xla")


def test_resolve_auto_path_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "from_env"))
    assert compile_cache.resolve("auto") == str(tmp_path / "from_env")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.resolve("auto") == str(tmp_path / "gcp_jax" / "xla")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compile_cache.resolve("~/elsewhere") == str(tmp_path / "elsewhere")
    assert compile_cache.resolve("") == ""


def test_programs_go_to_the_enabled_directory_and_off_means_none(session_cache, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert compile_cache.enable(str(first)) == str(first)
    jax.jit(lambda a: jnp.sin(a) * 2.0)(np.ones(3, np.float32))
    assert entries(first), "a compiled program is written to the cache"
    assert compile_cache.enable(str(second)) == str(second)
    jax.jit(lambda a: jnp.cos(a) * 3.0)(np.ones(3, np.float32))
    assert entries(second), "switching directories takes effect in the same process"
    written = entries(first) | entries(second)
    assert compile_cache.enable("") == ""
    assert jax.config.jax_compilation_cache_dir is None
    jax.jit(lambda a: jnp.tan(a) * 4.0)(np.ones(3, np.float32))
    assert entries(first) | entries(second) == written


def test_an_unusable_directory_warns_and_runs_without(session_cache, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="gcp_jax"):
        assert compile_cache.enable(str(blocker / "xla")) == ""
    assert "cannot write to" in caplog.text and "compile_cache_dir" in caplog.text
    assert jax.config.jax_compilation_cache_dir is None
    assert float(jax.jit(lambda a: a.sum() + 5.0)(np.ones(3, np.float32))) == 8.0


def test_damaged_entries_are_recompiled_with_a_warning(session_cache, tmp_path):
    """A process killed while writing an entry leaves a torn file: the next run warns and compiles afresh."""
    compile_cache.enable(str(tmp_path))
    x = np.arange(4, dtype=np.float32)
    expected = np.asarray(jax.jit(lambda a: jnp.exp(a) - 7.0)(x))
    assert entries(tmp_path)
    for name in entries(tmp_path):
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.warns(UserWarning, match="persistent compilation cache"):
        again = jax.jit(lambda a: jnp.exp(a) - 7.0)(x)  # a new function object: read back from the cache
    np.testing.assert_array_equal(np.asarray(again), expected)


def test_restarts_find_their_programs_in_the_cache(tmp_path):
    """train.py started, stopped (SIGTERM) and started again, twice: the second restart compiles nothing.

    (The first restart adds one program: its train step, which differs from the freshly initialised
    run's only in debug locations, yet gets another cache key; see docs/benchmarks.md, Start-up.)
    """
    data_dir, cache, workdir = str(tmp_path / "tfds"), str(tmp_path / "xla"), str(tmp_path / "run")
    flags = [*startup.train_flags("resnet_tiny", 32, data_dir), f"--config.compile_cache_dir={cache}"]
    flags += ["--config.gcp.dim=8", "--config.data.synthetic.image_size=32", "--config.batch_size=8"]
    flags += ["--config.eval_batch_size=8"]  # the 8 devices of the tests (tests/conftest.py)
    flags += ["--config.eval_every_epochs=0"]  # no eval step: how many steps run before SIGTERM lands varies
    steps = []
    cached = []
    for _ in range(3):
        steps.append(startup.time_to_first_step(flags, workdir)[1])  # every compilation cached (tests/conftest.py)
        cached.append(entries(cache))
    assert steps[0] < steps[1] < steps[2], "each restart resumed from the checkpoint the SIGTERM wrote"
    assert cached[0] and len(cached[1] - cached[0]) <= 1
    assert cached[2] == cached[1]
