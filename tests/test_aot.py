"""gcp_jax.aot: targets, the batch search, one-line failures, and real deviceless compiles of resnet_tiny + SEB
for an H100 and a multi-host TPU v5e slice (with the aot extra, which .ci/run installs)."""

import json
import os
import subprocess
import sys

import jax
import pytest
import tiny_config

from gcp_jax import aot, assembly, sharding
from gcp_jax.data import DatasetInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


@pytest.mark.parametrize(
    "name, platform, devices, hosts, topology",
    [
        ("h100", "gpu", 1, 1, "1x1x1"),
        ("H100x8", "gpu", 8, 1, "1x1x8"),
        ("a100-40gb", "gpu", 1, 1, "1x1x1"),
        ("v4-8", "tpu", 4, 1, "2x2x1"),
        ("v5e-4", "tpu", 4, 1, "2x2"),
        ("v5e-8", "tpu", 8, 1, "2x4"),
        ("v5litepod-16", "tpu", 16, 4, "4x4"),
        ("v5p-128", "tpu", 64, 16, "4x4x4"),
        ("v6e-256", "tpu", 256, 64, "16x16"),
    ],
)
def test_targets_by_the_names_users_know(name, platform, devices, hosts, topology):
    t = aot.parse_target(name)
    assert (t.platform, t.devices, t.hosts, t.topology) == (platform, devices, hosts, topology)
    assert t.devices == hosts * (
        t.host_bounds[0] * t.host_bounds[1] * t.host_bounds[2] if platform == "tpu" else devices
    )


def test_usable_memory_is_the_gpu_clients_share_and_all_hbm_on_tpu(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    h100, v5e = aot.parse_target("h100"), aot.parse_target("v5e-1")
    assert h100.usable_bytes == int(0.75 * h100.capacity_bytes)
    assert v5e.usable_bytes == v5e.capacity_bytes == 16 * aot.GiB
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert h100.usable_bytes == int(0.5 * h100.capacity_bytes)


@pytest.mark.parametrize("name", ["k80", "h100x0", "v5e-3", "v4-4", "v5p-6", "v7x-8"])
def test_unknown_targets_are_one_sentence(name):
    with pytest.raises(aot.AotError) as e:
        aot.parse_target(name)
    assert "\n" not in str(e.value) and name.lower() in str(e.value).lower()


def _memory(batch, base=100, per_example=7, knee=None):
    """A step's peak bytes: a line, steeper beyond `knee` (XLA's choices change with the batch)."""
    return base + per_example * batch + (0 if knee is None or batch <= knee else 5 * (batch - knee))


@pytest.mark.parametrize("usable, knee", [(800, None), (800, 40), (10_000, None), (106, None), (50, None)])
def test_the_search_finds_the_largest_batch_that_fits_in_few_compiles(usable, knee):
    compiled = []

    def compile_train(batches):
        compiled.extend(batches)
        return [{"per_device_batch": b, "peak_bytes": _memory(b, knee=knee)} for b in batches]

    best, exact, records = aot.largest_fitting(compile_train, usable)
    truth = max((b for b in range(1, 5000) if _memory(b, knee=knee) <= usable), default=0)
    assert (best, exact) == (truth, True)
    assert len(compiled) == len(set(compiled)) == len(records) <= aot.MAX_BATCH_COMPILES


def test_the_search_stops_at_its_budget_and_says_so():
    compile_train = lambda batches: [{"per_device_batch": b, "peak_bytes": _memory(b, knee=2)} for b in batches]
    best, exact, records = aot.largest_fitting(compile_train, 10_000, budget=3)
    assert len(records) == 3 and not exact and _memory(best, knee=2) <= 10_000


def test_a_tpu_compile_over_hbm_gives_what_it_needs():
    message = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 21.30G of 15.75G hbm. Exceeded hbm capacity by 5.55G."
    assert aot.hbm_overflow(message) == int(21.30 * aot.GiB)
    assert aot.hbm_overflow("INTERNAL: something else") is None
    v5e = aot.parse_target("v5e-4")
    refused = {"step": "train", "per_device_batch": 32, "peak_bytes": aot.hbm_overflow(message), "compile_s": 1.0}
    record = aot.with_fits(v5e, {**refused, "fits": False, "refused": True, "flops": None})
    assert not record["fits"] and "needs (TPU compiler)  21.30 GiB" in aot.step_table(v5e, record)
    assert aot.too_big(v5e, record) == (
        "the train step needs 21.3 GiB per device at batch 32, 16.0 GiB usable on TPU v5e; "
        "--max_batch finds the largest that fits."
    )


def _fake_python(tmp_path, body: str) -> str:
    """An executable standing in for the child's Python (fault injection)."""
    path = tmp_path / "python"
    path.write_text(f"#!{sys.executable}\nimport os, sys\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_an_xla_abort_in_the_child_is_one_line(tmp_path, monkeypatch):
    check = "F0000 triton_tiling_propagation.cc:627] Check failed: subdim_size_accumulator == dim_size (3136 vs. 112)"
    body = f"sys.stderr.write('noise\\n{check}\\n*** SIGABRT received ***\\n'); sys.stderr.flush(); os.abort()"
    monkeypatch.setattr(aot.sys, "executable", _fake_python(tmp_path, body))
    with pytest.raises(aot.AotError) as e:
        aot.compile_in_child(["--target=h100"], [("train", 16)])
    message = str(e.value)
    assert message.startswith("XLA aborted (SIGABRT) while compiling the train step at batch 16 per device: ")
    assert "Check failed: subdim_size_accumulator == dim_size (3136 vs. 112)" in message and "\n" not in message
    log = message.rpartition("(its output: ")[2].rstrip(")")
    with open(log) as f:  # the whole of it kept for a bug report
        assert check in f.read()
    os.remove(log)


def test_a_missing_plugin_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    for target in ("h100", "v5e-4"):
        problem = aot.missing_plugin(aot.parse_target(target))
        assert "pip install 'gcp-jax[aot]'" in problem and "\n" not in problem


# The Python with the aot extra (.ci/run: an environment of its own, so that the CUDA plugin's
# warnings at every `import jax` stay out of the other tests' processes).
AOT_PYTHON = os.environ.get("GCP_JAX_AOT_PYTHON", sys.executable)


def _cli(*args, env=None):
    return subprocess.run(
        [AOT_PYTHON, "-m", "gcp_jax.aot", "--config", TINY, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(env or {})},
        check=False,
    )


def test_config_mistakes_are_one_line():
    result = _cli("--target", "v5e-16")  # the tiny config's batch of 8 over 16 chips
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: the config's batches (train 8, eval 8) do not split over the 16 devices of v5e-16; give --per_device_batch N."
    )
    result = _cli("--target", "h100", "--max-batch")
    # The last line: with the aot extra, jax's CUDA plugin warns about the missing driver first.
    assert result.returncode == 2 and "Traceback" not in result.stderr and "usage:" not in result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: unrecognized arguments: --max-batch (python -m gcp_jax.aot --help)"
    )


def _has_extra() -> bool:
    if "GCP_JAX_AOT_PYTHON" in os.environ:
        return True  # given: a missing plugin there fails the tests with the pip command
    return all(aot.installed(m) for m in ("libtpu", "jax_plugins.xla_cuda12", "nvidia.cuda_nvcc"))


needs_extra = pytest.mark.skipif(
    not _has_extra() and os.environ.get("GCP_JAX_REQUIRE_AOT") != "1",
    reason="needs the aot extra: pip install -e '.[aot]' (.ci/run installs it and sets GCP_JAX_REQUIRE_AOT=1)",
)


def _conv_count_on_cpu(fast_paths: bool, monkeypatch) -> int:
    """Convolutions of the tiny train step lowered for this CPU, with or without the CPU fast paths."""
    monkeypatch.setenv("GCP_JAX_CPU_FAST_PATHS", "1" if fast_paths else "0")
    config = tiny_config.get_config()
    run = assembly.Run(config, sharding.make_mesh(jax.devices()[:1]), info=DatasetInfo("tiny", 4, 8, 8, ()))
    batch = aot.abstract_batch(config, run.mesh, "train", 8, 1)
    return run.train_step.lower(run.abstract_state(), batch).as_text().count("stablehlo.convolution")


@needs_extra
@pytest.mark.slow
def test_an_h100_compile_reports_memory_and_carries_xlas_convolutions(tmp_path, monkeypatch):
    out = tmp_path / "h100.json"
    result = _cli("--target", "h100", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert (rec["platform"], rec["devices"], rec["hosts"], rec["device_kind"]) == ("gpu", 1, 1, "NVIDIA H100 80GB HBM3")
    assert rec["usable_bytes"] == int(0.75 * rec["capacity_bytes"])
    for step in ("train", "eval"):
        r = rec[step]
        assert r["per_device_batch"] == 8 and r["fits"] and r["compile_s"] > 0
        assert r["peak_bytes"] == r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"] > 0
    assert rec["train"]["alias_bytes"] > 0  # the donated state
    # The GPU program has exactly the convolutions of the program without the CPU fast paths, not the CPU views.
    assert rec["train"]["conv_ops"] == _conv_count_on_cpu(False, monkeypatch) > _conv_count_on_cpu(True, monkeypatch)
    assert "train step on h100" in result.stdout and "usable by JAX" in result.stdout


@needs_extra
@pytest.mark.slow
def test_a_step_that_does_not_fit_is_one_line():
    tiny_gpu = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.00005"}  # 4 MiB of an H100: the step at batch 8 needs more
    result = _cli("--target", "h100", env=tiny_gpu)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step needs ") and last.endswith("--max_batch finds the largest that fits.")
    assert "per device at batch 8" in last and "usable on NVIDIA H100 80GB HBM3" in last


@needs_extra
@pytest.mark.slow
def test_a_multi_host_tpu_slice_compiles_as_one_program(tmp_path, monkeypatch):
    out = tmp_path / "v5e.json"
    result = _cli("--target", "v5litepod-16", "--per_device_batch", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert (rec["platform"], rec["devices"], rec["hosts"], rec["device_kind"]) == ("tpu", 16, 4, "TPU v5 lite")
    train = rec["train"]
    assert train["per_device_batch"] == 2 and train["fits"] and train["flops"] > 0
    assert (
        train["peak_bytes"]
        == train["argument_bytes"] + train["output_bytes"] + train["temp_bytes"] - train["alias_bytes"]
    )
    assert rec["usable_bytes"] == rec["capacity_bytes"] == 16 * aot.GiB
    assert train["conv_ops"] == _conv_count_on_cpu(False, monkeypatch)  # XLA's convolutions, as for the GPU


@pytest.mark.parametrize(
    "code, said",
    [
        (-6, "XLA aborted (SIGABRT)"),
        (134, "XLA aborted (SIGABRT)"),
        (-11, "the compiler crashed (SIGSEGV)"),
        (1, "the compiler exited (1)"),
    ],
)
def test_how_a_child_died_is_named(code, said):
    assert aot.died_how(code) == said
