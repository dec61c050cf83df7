"""Mesh and global batches, per-shard eigh in the compiled step, and two processes training together."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np

from configs import demo
from gcp_jax import assembly, data, optim, sharding, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_global_batch_is_sharded_over_all_devices():
    mesh = sharding.make_mesh()
    local = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "label": np.arange(16, dtype=np.int32)}
    batch = sharding.global_batch(local, mesh)
    assert batch["image"].shape == (16, 2) and len(batch["image"].addressable_shards) == 8
    assert {s.data.shape for s in batch["label"].addressable_shards} == {(2,)}
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])
    assert sharding.local_batch_size(16, mesh) == 16


def test_eigh_stays_per_shard():
    """The compiled train step eigendecomposes each device's own covariances: no all-gather. On
    several CPU devices one matrix per device and call (gcp_jax.batched_eigh), 2 calls in a loop."""
    config = demo.get_config()
    config.gcp.dim = 8
    model = assembly.build_model(config, num_classes=4)
    mesh = sharding.make_mesh()
    schedule = optim.learning_rate_schedule(config.optim, 4, 8)
    tx = optim.make_optimizer(config.optim, schedule)
    state = steps.create_train_state(steps.init_variables(model, 32, 0, mesh), tx, mesh)
    step = steps.make_train_step(model, tx, mesh)
    batch = sharding.global_batch(
        {"image": np.zeros((16, 32, 32, 3), np.float32), "label": np.zeros(16, np.int32)}, mesh
    )
    hlo = step.lower(state, batch).compile().as_text()
    eigh_operands = re.findall(r"custom-call\(.*?\).*?custom_call_target=\"\w*(?:syevd|eigh)\w*\"", hlo)
    shapes = re.findall(
        r"= \(f32\[(\d+),8,8\]",
        "\n".join(line for line in hlo.splitlines() if re.search(r"custom_call_target=\"\w*(?:syevd|eigh)", line)),
    )
    assert eigh_operands and shapes and set(shapes) == {"1"}, shapes  # not the 2 = 16 images / 8 devices at once
    assert "all-gather" not in hlo


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    """train.py as two jax.distributed processes (2 CPU devices each) on localhost: 2 steps + eval."""
    overrides = {
        "data.data_dir": str(tmp_path / "tfds"),
        "data.synthetic.num_classes": 4,
        "data.synthetic.train_per_class": 8,
        "data.synthetic.test_per_class": 5,
        "data.synthetic.image_size": 32,
        "data.resize_size": 32,
        "data.image_size": 32,
        "gcp.dim": 8,
        "batch_size": 8,
        "eval_batch_size": 8,
        "num_train_steps": 2,
        "log_every_steps": 1,
    }
    config = demo.get_config()
    for key, value in overrides.items():
        *groups, name = key.split(".")
        target = config
        for group in groups:
            target = target[group]
        target[name] = value
    data.dataset_info(config.data)  # generate the data set once, before two processes read it
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "demo.py"),
        f"--workdir={workdir}",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]
    procs = [
        subprocess.Popen(
            command + [f"--process_id={i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "batch 8 over 4 devices, 2 processes" in outputs[0][0]
    assert "metrics:" in outputs[0][0] and "metrics:" not in outputs[1][0]  # only process 0 reports
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    (test,) = [r for r in records if r["split"] == "test"]
    assert test["count"] == 20  # every test image once, over both processes' masks
    assert os.listdir(workdir / "checkpoints") == ["2"]
