"""README.md and docs/: every Python block runs as pasted, and the lists that mirror code are the code's.

A block that needs a file the user brings says so in its first line, `# needs: FILE`; it runs up to
the first line that names FILE (the whole block must still compile).
"""

import os
import re
import subprocess
import sys

import pytest
from test_structure import LAYERS

from gcp_jax import cli, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
CODE_LIST = re.compile(r"<!-- code:(\w+) -->\n(.*?)<!-- /code -->", re.S)
NEEDS = re.compile(r"# needs: (\S+)")


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def python_blocks():
    for doc in DOCS:
        for i, block in enumerate(BLOCK.findall(read(doc))):
            yield pytest.param(block, id=f"{doc}#{i + 1}")


def runnable_part(block: str) -> str:
    """The block up to the first line naming the file its `# needs: FILE` line asks for (all of it without one)."""
    lines = block.splitlines()
    needs = NEEDS.match(lines[0]) if lines else None
    if needs is None:
        return block
    cut = next((i for i, line in enumerate(lines[1:], 1) if needs[1] in line), len(lines))
    return "\n".join(lines[:cut]) + "\n"


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs_as_pasted(block, tmp_path):
    compile(block, "<block>", "exec")
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    result = subprocess.run(
        [sys.executable, "-c", runnable_part(block)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_needs_cuts_at_the_first_line_naming_the_file():
    block = "# needs: w.h5\nimport os\nmodel = 1\npath = 'w.h5'\nload(path)\n"
    assert runnable_part(block) == "# needs: w.h5\nimport os\nmodel = 1\n"


def names(text: str) -> list[str]:
    return re.findall(r"`([\w.]+)`", text)


def code_lists() -> dict[str, str]:
    found = {}
    for doc in DOCS:
        for name, text in CODE_LIST.findall(read(doc)):
            assert name not in found, f"{name} is shown twice"
            found[name] = text
    return found


def test_fields_a_resume_or_an_evaluation_may_change_are_the_code_s():
    lists = code_lists()
    assert names(lists["RESUME_MAY_CHANGE"]) == list(run_config.RESUME_MAY_CHANGE)
    assert names(lists["EVAL_MAY_CHANGE"]) == list(run_config.EVAL_MAY_CHANGE)


def test_exit_statuses_are_the_code_s():
    rows = "".join(f"| {status} | {meaning} |\n" for status, meaning in cli.EXIT_STATUSES.items())
    assert code_lists()["EXIT_STATUSES"] == "| status | meaning |\n| --- | --- |\n" + rows


def test_where_things_live_is_the_layer_table():
    """One row per layer of tests/test_structure.py, naming its modules in order (the other backticked
    words of a row name what is inside a module, e.g. `registry.FAMILIES`)."""
    rows = code_lists()["LAYERS"].strip().splitlines()[2:]
    assert len(rows) == len(LAYERS)
    for row, layer in zip(rows, LAYERS):
        shown = [name for name in names(row.split("|")[2]) if name in sum(LAYERS, ())]
        assert tuple(shown) == layer, row


def test_readme_is_a_front_door():
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\((docs/[\w.]+)", readme):
        assert os.path.isfile(os.path.join(ROOT, link)), link


def test_ci_runs_the_readme_s_test_command():
    readme_command = re.search(r"&& (python -m pytest [^\n]*)", read("README.md"))[1]
    assert read(".ci/run").rstrip().splitlines()[-1] == readme_command
