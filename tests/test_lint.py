"""The tree is clean under ruff, lint and format, as configured in pyproject.toml."""

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_lint_and_format_are_clean():
    for command in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "many_cli", "tests"], cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


# Import names that differ from their distribution's name.
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml"}


def test_every_package_the_code_imports_is_declared():
    requirements = importlib.metadata.requires("many-cli")  # as pyproject.toml declares them, extras included
    declared = {
        re.split(r"[<>=!\[ ;]", requirement, maxsplit=1)[0].lower().replace("-", "_") for requirement in requirements
    }
    imported = set()
    for path in (ROOT / "many_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "many_cli"}
    assert {"torch", "transformers", "matplotlib"} <= third_party  # the scan sees the code's imports
    missing = {name for name in third_party if DISTRIBUTION.get(name, name).lower().replace("-", "_") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def module_imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere in its code (a lazy import inside a function too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# The architecture's import rules, as the README states them.
MATH = {"lpm", "cpm"}  # pure functions on tensors: no file, no other many module
COMMANDS = {"stats", "merge", "infer", "export", "report"}  # each command's work
CALLERS = {"cli", "api", "demo", "bench", "__init__"}  # what runs commands: the only importers of their work


def test_modules_import_only_what_the_architecture_allows():
    imports = {
        ".".join(path.relative_to(ROOT / "many_cli").with_suffix("").parts): module_imports(path)
        for path in (ROOT / "many_cli").rglob("*.py")
    }
    assert "many_cli.merge.inputs" in imports["merge.solve"]  # the scan sees the code's imports
    for module in MATH:
        assert not {name for name in imports[module] if name.startswith("many_cli")}, module
    for module, names in imports.items():
        home = module.split(".")[0]
        if home in CALLERS:
            continue
        for command in COMMANDS - {home}:
            used = {name for name in names if name == f"many_cli.{command}" or name.startswith(f"many_cli.{command}.")}
            assert not used, f"{module} imports the {command} command's work ({sorted(used)})"
