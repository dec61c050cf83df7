"""The package's layering: every gcp_jax module imports only from layers below its own (no upward imports)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gcp_jax"

# Bottom to top; a module may import its own component and any component of a lower layer.
LAYERS = (
    ("checks", "imagenet", "cpu_tuning", "batched_eigh", "stopping", "compile_cache"),
    ("linalg", "layers", "sharding", "metrics", "checkpoint", "optim"),
    ("pooling", "spectrum", "steps"),
    ("models",),
    ("config",),
    ("data", "pretrained", "run_config", "writer_lock"),
    ("assembly",),
    ("weights_eval",),
    ("loop",),
    ("analysis", "cli"),
    ("aot",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def component(path: pathlib.Path) -> str:
    """gcp_jax/models/resnet.py -> models; gcp_jax/linalg.py -> linalg."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_components(path: pathlib.Path) -> set[str]:
    """The gcp_jax components a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gcp_jax":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gcp_jax.")}
    return found


def test_every_module_has_a_layer():
    components = {component(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert components <= set(RANK), sorted(components - set(RANK))


def test_no_module_imports_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = component(path)
        if own in ("__init__", "__main__"):
            continue
        for name in imported_components(path) - {own}:
            if RANK.get(name, -1) >= RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE)} imports gcp_jax.{name}")
    assert not upward, upward
