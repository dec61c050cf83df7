"""Markdown tables from benchmark records: what a benchmark prints and what `bench.report` writes into the docs.

Every number a table shows is a field of the record (ratios included, computed where they were
measured), so a table only formats: printing it and regenerating it from the committed JSON give
the same text. `render(record)` returns {table name: markdown}; no JAX needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

NONE = "—"


def markdown(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def sig(x: float | None, digits: int = 3) -> str:
    """`x` to `digits` significant figures, trailing zeros dropped, never in exponent form (0.98, 12.2, 725, 1234)."""
    if x is None:
        return NONE
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(digits - 1 - math.floor(math.log10(abs(x))), 0)
    text = f"{x:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def fixed(x: float | None, decimals: int, scale: float = 1.0, suffix: str = "") -> str:
    """`x * scale` with `decimals` decimals and a suffix; — for None."""
    return NONE if x is None else f"{x * scale:.{decimals}f}{suffix}"


def head_name(head: str) -> str:
    """gap, gcp(sqrt), gcp(seb): the head as the tables name it."""
    return "gap" if head == "gap" else f"gcp({head})"


# ----------------------------------------------------------------------------------------------
# bench.spectral


def spectral_tables(rec: dict) -> dict[str, str]:
    """The tables a record has: "functions" (each normalisation against eigh + autodiff), "layer" (GCP+SEB
    against the reference) and "family" (sqrt, SEB, iSQRT, MPA-Lya, iSICE: time and forward error)."""
    out = {}
    if rec["rows"]:
        out["functions"] = markdown(
            ("dtype", "batch", "function", "fwd ms", "fwd ×", "fwd+bwd ms", "fwd+bwd ×"),
            [
                (
                    r["dtype"],
                    r["batch"],
                    r["function"],
                    fixed(r["fwd_s"], 1, 1e3),
                    fixed(r["fwd_ratio"], 2),
                    fixed(r["fwdbwd_s"], 1, 1e3),
                    fixed(r["fwdbwd_ratio"], 2),
                )
                for r in rec["rows"]
            ],
        )
    if "layer" in rec:
        layer = rec["layer"]
        shape = ",".join(map(str, layer["features"]))
        table = markdown(
            (f"GCP+SEB layer, [{shape}] fwd+bwd", "ms", "speed-up vs reference"),
            [(r["name"], fixed(r["s"], 1, 1e3), fixed(r["speedup"], 1, suffix="×")) for r in layer["rows"]],
        )
        difference = (
            f"max relative difference of ∂L/∂X, ours (float32, exact) vs reference: {layer['grad_rel_diff']:.1e}"
        )
        out["layer"] = f"{table}\n\n{difference}"
    if "family" in rec:
        out["family"] = family_table(rec["family"])
    return out


def family_table(rows: list[dict]) -> str:
    """The GCP family side by side: times and forward error against the exact float64 counterpart."""
    return markdown(
        ("features [B,M,d]", "Σ rank", "function", "fwd ms", "fwd+bwd ms", "forward error", "against"),
        [
            (
                r["features"],
                r["rank"],
                r["function"],
                fixed(r.get("fwd_s"), 1, 1e3),
                fixed(r.get("fwdbwd_s"), 1, 1e3),
                f"{r['rel_error']:.1e}",
                r["reference"],
            )
            for r in rows
        ],
    )


# ----------------------------------------------------------------------------------------------
# bench.train_step (and the device check's train-step rows)

STEP_HEADER = (
    "backbone",
    "head",
    "backbone dtype",
    "px",
    "map",
    "batch",
    "images/s",
    "step (s)",
    "forward (s)",
    "step memory (GiB)",
    "spectral fwd+bwd (s)",
    "spectral share",
    "step × gap",
    "set-up + compile (s)",
)


def step_cells(r: dict) -> tuple:
    """One train-step row as the tables print it."""
    side = r.get("map")
    return (
        r["arch"],
        head_name(r["head"]),
        r["dtype"],
        r["size"],
        NONE if side is None else f"{side}×{side}",
        r["batch"],
        sig(r["images_per_s"]),
        sig(r["step_s"]),
        sig(r.get("forward_s")),
        sig(r["memory_gib"]),
        sig(r.get("spectral_s"), 2),
        fixed(r.get("spectral_share"), 1, 100, " %"),
        fixed(r.get("step_vs_gap"), 2),
        fixed(r.get("compile_s"), 0),
    )


def versus_table(v: dict) -> str:
    """ResNet-50 + SEB: ours against the PyTorch reference recipe, and the ratio of their images/s."""
    where = "backbone on the GPU, SVD on the CPU" if v["torch_device"] == "cuda" else v["torch_device"].upper()
    names = {
        "jax": "gcp_jax (float32, eigh, exact backward)",
        "torch": f"PyTorch reference recipe (float64 SVD, ordinary-K backward; {where})",
    }
    rows = [
        (
            name,
            v["size"],
            v["batch"],
            sig(v[f"{k}_images_per_s"]),
            sig(v[f"{k}_step_s"]),
            fixed(v.get(f"{k}_memory_gib"), 2),
        )
        for k, name in names.items()
    ]
    rows.append(("ratio ours / torch", "", "", f"**{fixed(v['ratio'], 2)}**", "", ""))
    return markdown(
        ("ResNet-50 (layer4 stride 1) + 256-d SEB, train step", "px", "batch", "images/s", "step (s)", "memory (GiB)"),
        rows,
    )


def train_step_tables(rec: dict) -> dict[str, str]:
    """Tables "steps" (one row per backbone, head, size and dtype) and "versus" (the PyTorch recipe), if it ran."""
    tables = {"steps": markdown(STEP_HEADER, [step_cells(r) for r in rec["rows"]])}
    if rec.get("versus"):
        tables["versus"] = versus_table(rec["versus"])
    return tables


# ----------------------------------------------------------------------------------------------
# bench.conv_kernels


def conv_kernels_tables(rec: dict) -> dict[str, str]:
    """Table "convolutions": forward, input and kernel gradient of each ResNet-50 convolution, ours / torch."""

    def pair(ours, theirs, decimals=1):
        return f"{fixed(ours, decimals, 1e3)} / {fixed(theirs, decimals, 1e3)}"

    rows = [
        (
            f"{r['kernel']}×{r['kernel']}/{r['stride']} {r['cin']}→{r['cout']} at {r['side']}²",
            r["count"],
            *(pair(a, b) for a, b in zip(r["ours_s"], r["torch_s"])),
        )
        for r in rec["rows"]
    ]
    totals = rec["totals"]
    rows.append(("model total (× count)", "", *(pair(a, b, 0) for a, b in zip(totals["ours_s"], totals["torch_s"]))))
    rows.append(("time ratio ours / torch, all three", "", f"{totals['ratio']:.2f}", "", ""))
    header = (f"convolution (batch {rec['batch']})", "count", *(f"{p} ms ours / torch" for p in ("fwd", "dx", "dw")))
    return {"convolutions": markdown(header, rows)}


# ----------------------------------------------------------------------------------------------
# bench.input_pipeline


def input_pipeline_tables(rec: dict) -> dict[str, str]:
    """Tables "rates" (images/s and images per CPU-second) and "cores" (the cores a training step needs)."""
    rates = markdown(
        ("source JPEG", "pipeline", "cores", "img/s", "img per CPU-s"),
        [
            (r["source"], r["pipeline"], r["cores"], fixed(r["images_per_s"], 0), fixed(r["images_per_cpu_s"], 0))
            for r in rec["rows"]
        ],
    )
    steps = rec["step_rates"]
    cores = markdown(
        ("source JPEG", *(f"{rate} img/s" for rate in steps)),
        [(r["source"], *(fixed(c, 1) for c in r["cores"])) for r in rec["cores_needed"]],
    )
    return {"rates": rates, "cores": cores}


# ----------------------------------------------------------------------------------------------
# bench.device_check


def environment_table(env: dict) -> str:
    """The device check's environment as a two-column table."""
    rows = [
        ("platform", env.get("platform", NONE)),
        ("devices", ", ".join(env.get("devices", [])) or NONE),
        ("device memory JAX may use (GiB)", sig(env.get("device_memory_gib"))),
        ("eigh implementations", ", ".join(env.get("eigh_implementations", [])) or "default only"),
        ("torch sees a GPU", "yes" if env.get("torch_cuda") else "no"),
        ("versions", env.get("versions", NONE)),
        ("missing", ", ".join(env.get("missing", [])) or "nothing"),
    ]
    return markdown(("environment", ""), rows)


def device_check_tables(rec: dict) -> dict[str, str]:
    """The device check's tables: sections, environment, tests, train_step, torch, spectral."""
    sections = markdown(
        ("section", "status", "seconds"),
        [(s["name"], s["status"], fixed(s["seconds"], 0)) for s in rec["rows"]],
    )
    tests = rec["tests"]
    test_table = markdown(
        ("test files", "passed", "failed", "errors", "skipped", "seconds"),
        [
            (
                " ".join(tests["files"]),
                tests["passed"],
                tests["failed"],
                tests["errors"],
                tests["skipped"],
                fixed(tests["seconds"], 0),
            )
        ],
    )
    failures = "".join(f"\n- failed: `{name}`" for name in tests["failures"])
    steps = [r for r in rec["train_step"] if "error" not in r]
    problems = "".join(f"\n- {r['arch']} {r['dtype']}: {r['error']}" for r in rec["train_step"] if "error" in r)
    spectral = markdown(
        ("batch", "d", "function", "fwd ms", "fwd × seb", "fwd+bwd ms", "fwd+bwd × seb"),
        [
            (
                r["batch"],
                r["d"],
                r["function"],
                fixed(r.get("fwd_s"), 2, 1e3),
                fixed(r.get("fwd_ratio"), 2),
                fixed(r.get("fwdbwd_s"), 2, 1e3),
                fixed(r.get("fwdbwd_ratio"), 2),
            )
            if "error" not in r
            else (r["batch"], r["d"], r["function"], r["error"], "", "", "")
            for r in rec["spectral"]
        ],
    )
    torch = rec["torch"]
    return {
        "sections": sections,
        "environment": environment_table(rec["environment"]),
        "tests": test_table + failures,
        "train_step": markdown(STEP_HEADER, [step_cells(r) for r in steps]) + problems,
        "torch": torch["error"] if "error" in torch else versus_table(torch),
        "spectral": spectral,
    }


# ----------------------------------------------------------------------------------------------
# bench.startup


def startup_tables(rec: dict) -> dict[str, str]:
    """Table "starts": seconds from launch to the first training step, first start against restarts."""
    rows = [
        (
            r["arch"],
            r["image_size"],
            r["batch"],
            r["start"],
            fixed(r["seconds"], 1),
            f"**{r['speed_up']:.1f}×**",
            ", ".join(f"{s:.1f}" for s in r.get("all_seconds", [r["seconds"]])),
        )
        for r in rec["rows"]
    ]
    header = (
        "backbone + SEB",
        "px",
        "batch",
        "start",
        "to first step (s)",
        "× sooner than first start",
        "each repeat (s)",
    )
    return {"starts": markdown(header, rows) + f"\n\nimports alone: {rec['imports_s']:.1f} s"}


def fits_tables(rec: dict) -> dict[str, str]:
    """Table "fits": the largest per-device train batch of each backbone and dtype per target (≥: not
    confirmed by compiling one more), with the mean compile time; "failed": the compiler failed (the
    record says how); — : not compiled yet."""
    from bench import fits  # its cell order; it imports no JAX

    order = lambda key, known: (known.index(key) if key in known else len(known), key)
    targets = sorted({*fits.TARGETS, *(r["target"] for r in rec["rows"])}, key=lambda t: order(t, fits.TARGETS))
    cells: dict[tuple[str, str], dict[str, str]] = {(arch, dtype): {} for arch in fits.ARCHS for dtype in fits.DTYPES}
    for r in sorted(rec["rows"], key=lambda r: (order(r["arch"], list(fits.ARCHS)), order(r["dtype"], fits.DTYPES))):
        if "error" in r:
            text = "failed"  # the record's "error" says how
        else:
            text = f"{'' if r['exact'] else '≥'}{r['max_per_device_batch']} ({r['compile_s']:.0f} s)"
        cells.setdefault((r["arch"], r["dtype"]), {})[r["target"]] = text
    rows = [(f"{arch} + SEB", dtype, *(row.get(t, NONE) for t in targets)) for (arch, dtype), row in cells.items()]
    return {"fits": markdown(("448 px", "backbone dtype", *targets), rows)}


RENDERERS: dict[str, Callable[[dict], dict[str, str]]] = {
    "spectral": spectral_tables,
    "train_step": train_step_tables,
    "conv_kernels": conv_kernels_tables,
    "input_pipeline": input_pipeline_tables,
    "device_check": device_check_tables,
    "startup": startup_tables,
    "fits": fits_tables,
}


def render(rec: dict) -> dict[str, str]:
    """{table name: markdown} of a benchmark record."""
    return RENDERERS[rec["benchmark"]](rec)


def caption(rec: dict) -> str:
    """How, where and when a record was measured (and where a transcribed one comes from)."""
    line = f"`{rec['command']}` — {rec['machine']}; {rec['date']}."
    return f"{line} {rec['source']}" if rec.get("source") else line


def print_record(rec: dict) -> None:
    """Print every table of `rec`, then its caption."""
    print()
    for table in render(rec).values():
        print(table, end="\n\n")
    print(caption(rec), flush=True)
