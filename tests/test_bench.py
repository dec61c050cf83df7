"""bench/: the docs' tables match the committed records, the device check runs end to end (--quick), the helpers."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import cli, common, device_check, reference, report, tables


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("doc", list(report.DOCUMENTS))
def test_docs_tables_are_what_the_committed_records_generate(doc):
    text = read(os.path.join(common.ROOT, doc))
    assert report.referenced(text), f"{doc} shows no generated table"
    regenerated = report.regenerate(text, report.load_records(), captions=report.DOCUMENTS[doc])
    assert regenerated == text, "run `python -m bench report`"


def test_every_committed_record_is_shown_in_docs_benchmarks():
    shown = report.referenced(read(os.path.join(common.ROOT, "docs", "benchmarks.md")))
    assert set(report.load_records()) <= shown


def test_report_replaces_a_stale_table_and_refuses_a_broken_marker():
    records = report.load_records()
    stale = "before\n<!-- bench:train_step_h100.json#steps -->\n| old |\n<!-- /bench -->\nafter\n"
    fresh = report.regenerate(stale, records)
    assert "| old |" not in fresh and "| efficientnet_b0 | gcp(seb)" in fresh
    assert fresh.startswith("before\n") and fresh.endswith("<!-- /bench -->\nafter\n")
    assert report.regenerate(fresh, records) == fresh
    with pytest.raises(KeyError, match=r"nothing\.json"):
        report.regenerate("<!-- bench:nothing.json#steps -->\n<!-- /bench -->", records)
    with pytest.raises(ValueError, match="no <!-- /bench -->"):
        report.regenerate(stale.replace("<!-- /bench -->", "") + stale, records)


def test_significant_figures_never_use_an_exponent():
    assert [tables.sig(x) for x in (0.98, 0.0221, 12.195, 725.4, 1234.4, None)] == [
        "0.98",
        "0.0221",
        "12.2",
        "725",
        "1234",
        "—",
    ]


def test_a_record_names_the_command_that_reruns_it_not_where_it_was_written():
    rec = common.record("spectral", ["--batches", "8", "--out", "a.json", "--repeats=3"], "machine", [])
    assert rec["command"] == "python -m bench spectral --batches 8 --repeats=3"
    assert common.command("spectral", ["--out=b.json"]) == "python -m bench spectral"


def test_pytest_summary_counts_a_run_cut_short():
    out = "\n".join(
        [
            "tests/test_a.py::test_one PASSED                [ 10%]",
            "tests/test_a.py::test_two[x-1] FAILED          [ 20%]",
            "tests/test_a.py::test_three SKIPPED (why)      [ 30%]",
            "tests/test_b.py::test_four PASSED              [ 40%]",
            "ERROR tests/test_c.py - ModuleNotFoundError: No module named 'PIL'",
        ]
    )
    summary = device_check.pytest_summary(out, ("tests/test_a.py",))
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (2, 1, 1, 1)
    assert summary["failures"] == ["tests/test_a.py::test_two[x-1]", "tests/test_c.py"]


def test_a_spent_budget_records_every_task_as_not_run_and_still_reports(tmp_path):
    check = device_check.Check(device_check.FULL, False, [], str(tmp_path / "check.json"))
    check.deadline = 0
    tasks = device_check.plan(device_check.FULL, [])
    for task in tasks:
        check.run(task)
    rec = json.loads((tmp_path / "check.json").read_text())
    assert [(s["name"], s["status"]) for s in rec["rows"]] == [(t.name, "not run: the budget was spent") for t in tasks]
    assert len(rec["train_step"]) == 6 and all("error" in r for r in rec["train_step"])
    assert "not run" in tables.render(rec)["torch"]


def test_a_child_past_its_limit_is_killed_and_keeps_what_it_printed():
    start = time.monotonic()
    argv = [sys.executable, "-c", "import time; print('BENCH-ROW {\"n\": 1}', flush=True); time.sleep(60)"]
    status, out, _ = device_check.run_child(argv, timeout=2)
    assert status == "timed out after 2 s"
    assert device_check.worker_rows(out) == [{"n": 1}]
    assert time.monotonic() - start < 30


def test_the_reference_recipe_agrees_with_gcp_jax_on_full_rank_covariances():
    import jax
    import jax.numpy as jnp

    from gcp_jax import linalg

    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(3, 40, 8)), 0).astype(np.float32)  # M = 40 > d = 8: full rank
    w = rng.normal(size=(3, 36)).astype(np.float32)
    out, grad = reference.seb_layer(x, w)
    layer = lambda f: linalg.triu_vec(linalg.seb(linalg.covariance(f)))
    ours, our_grad = jax.jit(lambda x, w: (layer(x), jax.vjp(layer, x)[1](w)[0]))(jnp.asarray(x), jnp.asarray(w))
    np.testing.assert_allclose(ours, out, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(our_grad, grad, rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("name", [n for n in (*cli.BENCHMARKS, *cli.TOOLS) if n != "report"])
def test_every_benchmark_takes_the_common_flags(name, capsys):
    with pytest.raises(SystemExit):
        cli.main([name, "--help"])
    usage = capsys.readouterr().out
    assert f"python -m bench {name}" in usage and "--repeats" in usage and "--out" in usage


def test_an_unknown_benchmark_gets_the_list():
    assert cli.main(["nonesuch"]) == 2


def test_importing_bench_tunes_nothing():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = "import os, bench, bench.cli, bench.report; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=common.ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "None", out.stderr


@pytest.mark.slow
def test_device_check_quick_runs_every_task_and_writes_every_section(tmp_path):
    path = tmp_path / "quick.json"
    argv = [sys.executable, "-m", "bench", "device_check", "--quick", "--out", str(path)]
    subprocess.run(argv, cwd=common.ROOT, check=True, capture_output=True, text=True, timeout=300)
    rec = json.loads(path.read_text())
    names = [t.name for t in device_check.plan(device_check.QUICK, [])]
    assert [s["name"] for s in rec["rows"]] == names
    assert all(s["status"] == "ok" for s in rec["rows"]), rec["rows"]
    assert rec["environment"]["platform"] == "cpu" and rec["machine"].startswith("jax ")
    assert rec["environment"]["missing"] == []
    spectral = {r["function"]: r for r in rec["spectral"]}
    assert spectral[device_check.SEB]["fwdbwd_ratio"] == 1.0
    assert "error" in spectral["eigh+autodiff √ (jacobi)"]  # LAPACK has no Jacobi eigh
    (step,) = rec["train_step"]
    assert (step["arch"], step["batch"], step["batches_tried"]) == ("resnet_tiny", 2, [2])
    assert step["images_per_s"] > 0 and step["spectral_share"] > 0
    assert rec["torch"]["batch"] == 2 and rec["torch"]["ratio"] > 0
    assert (rec["tests"]["passed"], rec["tests"]["failed"]) == (1, 0)
    assert set(tables.render(rec)) == {"sections", "environment", "tests", "train_step", "torch", "spectral"}
