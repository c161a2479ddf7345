"""The reverse dependencies issue 12 removed stay gone: read from the package's source, and from what an import loads.

clustering does not reach into the model families, the accelerated pipeline does not import the reference model (it
registers itself), `import catrt` and the runtime's modules do not build the tiny pipelines, the export's sample
recorder neither asserts nor stops diffusers' loop with an exception, and no module keeps a logger it never logs with.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "catrt"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from a import b` counts as a and a.b), at any depth."""
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _unused_loggers(path: Path) -> list[str]:
    """Names bound to `logging.getLogger(...)` at module level that the module never reads."""
    tree = _tree(path)
    made = [
        target.id
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "getLogger"
        for target in node.targets if isinstance(target, ast.Name)
    ]
    read = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return [name for name in made if name not in read]


def test_the_unused_logger_check_sees_a_logger_that_logs_nothing(tmp_path: Path) -> None:
    module = tmp_path / "module.py"
    module.write_text("import logging\nlogger = logging.getLogger(__name__)\nother = logging.getLogger('x')\nother.info('hi')\n")
    assert _unused_loggers(module) == ["logger"]


def test_no_module_keeps_a_logger_that_logs_nothing() -> None:
    unused = {str(path.relative_to(PACKAGE.parent)): names for path in sorted(PACKAGE.rglob("*.py")) if (names := _unused_loggers(path))}
    assert unused == {}


@pytest.mark.parametrize(("module", "forbidden"), [
    ("clustering.py", "catrt.models"),  # clustering reads token grids (catrt.tokens), no family's adapter
    ("pipeline.py", "catrt.reference"),  # the reference pipeline registers its own class
    ("pipeline.py", "catrt.tiny"),
    ("runtime.py", "catrt.tiny"),
])
def test_a_core_module_does_not_import_what_depends_on_it(module: str, forbidden: str) -> None:
    imported = _imported(PACKAGE / module)
    assert not [name for name in imported if name == forbidden or name.startswith(forbidden + ".")]


def test_the_sample_recorder_neither_asserts_nor_raises_to_stop_the_loop() -> None:
    """The build's sample records the first transformer call and lets diffusers' loop run on (no exception stops it)."""
    tree = _tree(PACKAGE / "export" / "sample.py")
    assert not [node for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    recorder = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "_FirstCallRecorder")
    assert not [node for node in ast.walk(recorder) if isinstance(node, ast.Raise)]


def test_importing_catrt_and_its_runtime_builds_no_tiny_pipeline_and_loads_no_reference_model() -> None:
    """`catrt.accelerate`'s modules and every family's adapter; loading a model by name (catrt.loading) does need them."""
    code = (
        "import sys, catrt, catrt.pipeline, catrt.runtime, catrt.clustering, catrt.models\n"
        "print(sorted(n for n in sys.modules if n == 'catrt.tiny' or n.startswith('catrt.reference')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
