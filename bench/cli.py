"""The benchmark commands: `python -m bench NAME [flags]`, NAME one of BENCHMARKS (`--help` after NAME for its flags)."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "spectral": "the spectral functions and the GCP+SEB layer against autodiff and the reference recipe",
    "train_step": "images/s of the real train step, its forward, memory, spectral share; vs the PyTorch recipe",
    "conv_kernels": "each ResNet-50 convolution alone, ours against PyTorch's",
    "input_pipeline": "images/s per CPU core of the training and evaluation preprocessing",
    "startup": "seconds to the first training step: a first start, a restart from the compile cache, one without",
    "fits": "the largest per-device batch of the 448 px runs on GPUs and TPUs, by compiling for them on this CPU",
    "device_check": "one prepared check of an accelerator (< 8 minutes): tests, train steps, torch, spectral head",
    "report": "regenerate the tables of README.md and docs/benchmarks.md from bench/results/*.json",
}
# One-off reproductions (bench/tools/): the cause of a fixed bug, measured; a test keeps the fix.
TOOLS = {
    "eigh_devices": "batched eigh and a train step on 1-8 fake CPU devices: the old dispatch hangs, the new does not",
}
INTERNAL = ("reference_torch",)  # the PyTorch recipe's child process of train_step


def usage() -> str:
    width = max(map(len, {**BENCHMARKS, **TOOLS}))
    lines = [f"  {name.ljust(width)}  {what}" for name, what in BENCHMARKS.items()]
    tools = [f"  {name.ljust(width)}  {what}" for name, what in TOOLS.items()]
    head = "usage: python -m bench NAME [flags]   (python -m bench NAME --help)"
    return "\n".join([head, "", *lines, "", "one-off tools (bench/tools/):", *tools])


def main(argv: list[str]) -> int:
    """Run benchmark argv[0] with the flags that follow; its module is bench.<name> (bench.tools.<name> for a
    tool), with main(argv) -> int."""
    if not argv or argv[0] not in (*BENCHMARKS, *TOOLS, *INTERNAL):
        print(usage())
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f"bench.tools.{argv[0]}" if argv[0] in TOOLS else f"bench.{argv[0]}")
    return module.main(argv[1:])
