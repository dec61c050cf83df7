"""One prepared check of whatever accelerator JAX sees: < 8 minutes, one JSON file, one printed report.

    python -m bench device_check --out device_check.json       # on a GPU or TPU host
    python -m bench device_check --quick --out quick.json       # the whole script on a CPU at tiny sizes (tests)
    python -m bench device_check --tasks efficientnet_b5        # a second call: only what the first did not reach

Tasks, in this order (the issue's targets first), each in a child process with its own time limit
inside one overall budget, so that a hung compile, a crash or an out-of-memory is recorded and
the others still run; the JSON is rewritten after every task, whatever happens:

1. environment: versions, devices and their memory, the `eigh` implementations this jax offers.
2. spectral: the spectral head alone at d = 256, batch 16–128: `eigh` with each implementation
   (QR, Jacobi, QDWH where the platform has it; the `implementation` argument exists since
   jax 0.8.1) with JAX's own derivative of U diag(√λ) Uᵀ, gcp_jax's sqrtm and SEB (exact
   backward), Newton–Schulz at 3/5/10 iterations; forward and forward+backward, × our SEB head.
3. train steps (bench.train_step) of ResNet-50 (layer4 stride 1), EfficientNet-B0 and -B5, each
   + SEB at 448 px, float32 and bfloat16 backbone, at the largest batch of 64/32/16 that fits, on
   one device: images/s, step memory, set-up + compile, spectral share (no forward column: its
   compile would cost the budget a third more). ResNet-50 and B0
   in float32 first, then the tests, then bfloat16, then B5.
4. torch: the PyTorch reference recipe (bench.reference_torch) for ResNet-50 + SEB at the
   ResNet-50 batch, when torch sees a GPU: backbone on CUDA, SVD and its backward in float64 on
   the CPU, as published.
5. tests: pytest on the linalg, pooling, layers and training tests, on the device (GPU 0): the
   project's own tests rather than a second, curated copy of them, so new tests are covered;
   what the time limit does not reach is counted as not run.

--quick runs every task on the CPU at tiny sizes (resnet_tiny at 64 px, batch 2, float32; d = 16;
one test of tests/test_bench.py) so that the test suite keeps the script working; its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

from bench import common, tables

ROW = "BENCH-ROW "  # prefix of a worker's result lines on stdout
NEEDED = ("ml_collections", "pytest", "pillow")  # what the tests import; wheels travel if missing
TEST_FILES = ("tests/test_linalg.py", "tests/test_pooling.py", "tests/test_layers.py", "tests/test_training.py")
SEB = "seb (code, exact): our head"
MIN_START_S = 15  # a task is not started with less time than this left
# --quick compiles faster (its numbers mean nothing): XLA:CPU spends 20 s of CPU compiling resnet_tiny's
# threefry-based init (5 s with rbg keys) and half its train-step compile in LLVM's optimisations.
QUICK_ENV = {"JAX_DEFAULT_PRNG_IMPL": "rbg"}
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and time limits of a full or a --quick check."""

    size: int
    batches: tuple[int, ...]
    archs: tuple[str, ...]
    dtypes: tuple[str, ...]
    spectral_d: int
    spectral_batches: tuple[int, ...]
    newton_schulz_iters: tuple[int, ...]
    repeats: int
    test_files: tuple[str, ...]
    budget_s: float
    limits_s: dict  # per task kind: environment, spectral, train, torch, tests


FULL = Settings(
    size=448,
    batches=(64, 32, 16),
    archs=("resnet50", "efficientnet_b0", "efficientnet_b5"),
    dtypes=("float32", "bfloat16"),
    spectral_d=256,
    spectral_batches=(16, 32, 64, 128),
    newton_schulz_iters=(3, 5, 10),
    repeats=10,
    test_files=TEST_FILES,
    budget_s=450,
    limits_s={"environment": 60, "spectral": 100, "train": 150, "torch": 90, "tests": 120},
)
QUICK = dataclasses.replace(
    FULL,
    size=64,
    batches=(2,),
    archs=("resnet_tiny",),
    dtypes=("float32",),
    spectral_d=16,
    spectral_batches=(2,),
    newton_schulz_iters=(3,),
    repeats=2,
    test_files=("tests/test_bench.py::test_pytest_summary_counts_a_run_cut_short",),
    budget_s=240,
    limits_s={"environment": 60, "spectral": 60, "train": 90, "torch": 60, "tests": 60},
)


@dataclasses.dataclass(frozen=True)
class Task:
    """One child process: `kind` (a key of Settings.limits_s), its name in the report, its worker flags."""

    kind: str
    name: str
    flags: tuple[str, ...] = ()


def plan(s: Settings, names: list[str]) -> list[Task]:
    """The tasks in the order they run: the environment, then the targets (ResNet-50 vs torch, B0), B5 last.

    `names` keeps only the tasks whose kind or name contains one of them (the environment always runs).
    """
    train = [(a, d) for d in s.dtypes for a in s.archs[:2]] + [(a, d) for a in s.archs[2:] for d in s.dtypes]
    steps = [Task("train", f"{a} {d}", ("--arch", a, "--dtype", d)) for a, d in train]
    rest = [Task("spectral", "spectral"), *steps[:1], Task("torch", "torch"), *steps[1:2], Task("tests", "tests")]
    rest += steps[2:]
    chosen = [t for t in rest if not names or any(n == t.kind or n in t.name for n in names)]
    return [Task("environment", "environment"), *chosen]


# ----------------------------------------------------------------------------------------------
# The parent: runs the tasks, keeps the JSON, prints the report (no JAX here: the children own the device).


def run_child(argv: list[str], timeout: float, env: dict | None = None) -> tuple[str, str, str]:
    """(status, stdout, stderr) of a child process killed (with anything it started) after `timeout` seconds."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=common.ROOT,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    return status, out, err


def worker_rows(out: str) -> list[dict]:
    """The result rows a worker printed."""
    return [json.loads(line[len(ROW) :]) for line in out.splitlines() if line.startswith(ROW)]


PYTEST_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", re.M)
PYTEST_SUMMARY = re.compile(r"^(FAILED|ERROR) (tests/\S+)", re.M)


def pytest_summary(out: str, files: tuple[str, ...]) -> dict:
    """Counts of a `pytest -v -rfE` run (complete or cut short), and the names of what failed."""
    outcomes = dict(PYTEST_LINE.findall(out))
    for kind, name in PYTEST_SUMMARY.findall(out):  # collection errors appear only in the summary
        outcomes.setdefault(name, kind)
    count = lambda *kinds: sum(v in kinds for v in outcomes.values())
    return {
        "files": list(files),
        "passed": count("PASSED", "XFAIL"),
        "failed": count("FAILED", "XPASS"),
        "errors": count("ERROR"),
        "skipped": count("SKIPPED"),
        "failures": sorted(name for name, v in outcomes.items() if v in ("FAILED", "XPASS", "ERROR")),
        "seconds": None,
    }


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def versus(ours: dict | None, theirs: dict) -> dict:
    """The torch table: the recipe's row against our float32 row of its architecture (if that ran), and their ratio."""
    ours = ours or dict.fromkeys(("images_per_s", "step_s", "memory_gib"))
    return {
        "size": theirs["size"],
        "batch": theirs["batch"],
        "torch_device": theirs["device"],
        "jax_images_per_s": ours["images_per_s"],
        "jax_step_s": ours["step_s"],
        "jax_memory_gib": ours["memory_gib"],
        "torch_images_per_s": theirs["images_per_s"],
        "torch_step_s": theirs["step_s"],
        "torch_memory_gib": theirs["memory_gib"],
        "ratio": ours["images_per_s"] / theirs["images_per_s"] if ours["images_per_s"] else None,
    }


class Check:
    """The parent: the record being filled in, the overall deadline, and how each task's results are kept."""

    def __init__(self, s: Settings, quick: bool, argv: list[str], out: str):
        self.s, self.quick, self.out = s, quick, out
        self.deadline = time.monotonic() + s.budget_s
        self.rec = common.record("device_check", argv, "", [], quick=quick, budget_s=s.budget_s)
        self.rec.update(environment={}, spectral=[], train_step=[], torch={}, tests=pytest_summary("", s.test_files))

    def run(self, task: Task) -> None:
        """Run `task` within its limit and what is left of the budget; keep its results and a status row."""
        limit = min(self.s.limits_s[task.kind], self.deadline - time.monotonic())
        start = time.monotonic()
        out = err = ""
        if limit < MIN_START_S:
            status = "not run: the budget was spent"
        elif task.kind == "torch" and not (self.quick or self.rec["environment"].get("torch_cuda")):
            status = "skipped: torch sees no GPU"
        elif task.kind == "tests":
            status, err = self.run_tests(limit)
        else:
            status, out, err = run_child(self.worker_argv(task), limit, self.worker_env())
        if task.kind != "tests":
            self.keep(task, worker_rows(out), f"{status}: {last_line(err)}" if err and status != "ok" else status)
        seconds = time.monotonic() - start
        self.rec["rows"].append({"name": task.name, "status": status, "seconds": seconds})
        detail = "\n".join(err.strip().splitlines()[-15:]) if not status.startswith(("ok", "skipped")) else ""
        print(f"# {task.name}: {status} ({seconds:.0f} s)" + (f"\n{detail}" if detail else ""), flush=True)
        common.write_record(self.out, self.rec)

    def ours(self) -> dict | None:
        """Our float32 train step of the first architecture (ResNet-50), which the torch recipe is compared with."""
        first = self.s.archs[0]
        return next(
            (r for r in self.rec["train_step"] if r["arch"] == first and r["dtype"] == "float32" and "error" not in r),
            None,
        )

    def worker_argv(self, task: Task) -> list[str]:
        flags = list(task.flags)
        if task.kind == "torch":  # the recipe at our batch, or the largest that fits when ours did not run
            flags += ["--batch", ",".join(map(str, [self.ours()["batch"]] if self.ours() else self.s.batches))]
        quick = ["--quick"] if self.quick else []
        return [sys.executable, "-m", "bench", "device_check", "--worker", task.kind, *quick, *flags]

    def worker_env(self) -> dict:
        """The workers' environment: this process's, and with --quick the settings that compile faster."""
        env = dict(os.environ)
        if self.quick:
            env.update(QUICK_ENV, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip())
        return env

    def keep(self, task: Task, rows: list[dict], status: str) -> None:
        """Store a worker's rows where the record keeps that kind of result (a failure as an "error")."""
        if task.kind == "environment" and rows:
            self.rec["environment"] = rows[0]
            self.rec["machine"] = rows[0]["machine"]
        elif task.kind == "spectral":
            self.rec["spectral"] = rows
        elif task.kind == "train":
            arch, dtype = task.flags[1], task.flags[3]
            self.rec["train_step"] += rows or [{"arch": arch, "dtype": dtype, "error": status}]
        elif task.kind == "torch":
            self.rec["torch"] = versus(self.ours(), rows[0]) if rows else {"error": status}

    def run_tests(self, limit: float) -> tuple[str, str]:
        """pytest on the test files, on GPU 0 where there is a GPU; failing tests are a result, not a crash."""
        env = dict(os.environ)
        if self.rec["environment"].get("platform") == "gpu":  # tests/conftest.py hides GPUs unless told
            env.setdefault("CUDA_VISIBLE_DEVICES", "0")
        flags = ["-v", "-rfE", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        start = time.monotonic()
        status, out, err = run_child([sys.executable, "-m", "pytest", *flags, *self.s.test_files], limit, env)
        self.rec["tests"] = {**pytest_summary(out, self.s.test_files), "seconds": time.monotonic() - start}
        if status == "failed (exit 1)":  # pytest's exit 1: some tests failed
            status = f"ok, {self.rec['tests']['failed']} failed, {self.rec['tests']['errors']} errors"
        return status, out + err


# ----------------------------------------------------------------------------------------------
# The workers: each prints its rows as `BENCH-ROW {json}` lines (imported only in the child).


def emit(row: dict) -> None:
    print(ROW + json.dumps(row), flush=True)


def environment_worker(s: Settings, args) -> None:
    """Versions, devices, device memory, eigh implementations, and whether torch sees a GPU."""
    import importlib.util

    import jax

    from bench.timing import device_memory_limit, machine_line

    implementations = getattr(jax.lax.linalg, "EighImplementation", None)
    torch_cuda = False
    if jax.default_backend() == "gpu" and importlib.util.find_spec("torch") is not None:
        import torch

        torch_cuda = torch.cuda.is_available()
    limit = device_memory_limit()
    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "timm", "torchvision", *NEEDED)
    emit(
        {
            "machine": machine_line(),
            "platform": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()],
            "device_memory_gib": None if limit is None else limit / 2**30,
            "eigh_implementations": [i.value for i in implementations] if implementations else [],
            "torch_cuda": torch_cuda,
            "versions": common.versions(*packages),
            "missing": [name for name in NEEDED if not common.versions(name)],
        }
    )


def spectral_worker(s: Settings, args) -> None:
    """The spectral head alone: every eigh implementation, our sqrtm and SEB, Newton–Schulz; × our SEB head."""
    import functools

    import jax

    from bench import spectral
    from gcp_jax import linalg

    fns = {"eigh+autodiff √ (default)": spectral.eigh_autodiff_sqrtm}
    for impl in getattr(jax.lax.linalg, "EighImplementation", ()):
        fns[f"eigh+autodiff √ ({impl.value})"] = functools.partial(spectral.eigh_autodiff_sqrtm, implementation=impl)
    fns["sqrtm (exact)"] = linalg.sqrtm
    fns[SEB] = functools.partial(linalg.normalize, options=linalg.SpectralOptions(norm="seb"))
    for iters in s.newton_schulz_iters:
        fns[f"newton_schulz_sqrtm iters={iters}"] = functools.partial(linalg.newton_schulz_sqrtm, iters=iters)
    for batch in s.spectral_batches:
        a = spectral.spd_batch(batch, s.spectral_d, "float32")
        for row in spectral.add_ratios(spectral.time_functions(fns, a, s.repeats, batch=batch, d=s.spectral_d), SEB):
            emit(row)


def train_worker(s: Settings, args) -> None:
    """`args.arch` + SEB at the largest fitting batch, on the first device (bench.train_step.largest_fitting)."""
    import jax

    from bench import train_step
    from gcp_jax import sharding

    mesh = sharding.make_mesh(jax.devices()[:1])
    case = train_step.Case(args.arch, "seb", s.size, s.batches[0], args.dtype)
    emit(train_step.largest_fitting(case, list(s.batches), mesh, s.repeats, forward=False))  # its compile: budget


def torch_worker(s: Settings, args) -> None:
    """The PyTorch recipe's train step at the largest of `args.batch` that fits: fastest of s.repeats after 2 warm-ups."""
    import torch

    from bench import reference_torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for batch in args.batch:
        try:
            threads = 1 if args.quick else None  # OpenMP threads spin for seconds per step on a loaded host
            step, peak_bytes = reference_torch.make_train_step(s.size, batch, device, threads)
            for _ in range(2):
                step()
            step_s = min(reference_torch.seconds(step) for _ in range(s.repeats))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        memory = None if device == "cpu" else peak_bytes() / 2**30
        row = {"size": s.size, "batch": batch, "device": device, "images_per_s": batch / step_s, "step_s": step_s}
        emit({**row, "memory_gib": memory})
        return


WORKERS = {"environment": environment_worker, "spectral": spectral_worker, "train": train_worker, "torch": torch_worker}


def main(argv: list[str]) -> int:
    p = common.parser("device_check", __doc__, repeats=FULL.repeats, repeats_note=f"; --quick {QUICK.repeats}")
    p.set_defaults(repeats=None)  # the settings' own
    p.add_argument("--quick", action="store_true", help="Every task on the CPU at tiny sizes (the tests run this).")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"Seconds for all tasks ({FULL.budget_s:.0f}; --quick {QUICK.budget_s:.0f}).",
    )
    p.add_argument(
        "--tasks", type=common.listed(), default=[], help="Only these tasks (kinds or names), e.g. b5,tests."
    )
    p.add_argument("--worker", default="", choices=("", *WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--arch", default="", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=common.listed(int), default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    s = QUICK if args.quick else FULL
    s = dataclasses.replace(
        s,
        repeats=s.repeats if args.repeats is None else args.repeats,
        budget_s=s.budget_s if args.budget is None else args.budget,
    )
    if args.worker:
        WORKERS[args.worker](s, args)
        return 0
    check = Check(s, args.quick, argv, args.out)
    for task in plan(s, args.tasks):
        check.run(task)
    tables.print_record(check.rec)
    return 0
