"""The import direction the architecture page promises, checked on every module's source.

Layers, lowest first: `common` (imports no other project package), then `client` and `server`
(each may import `common`, never each other), then `simulations` (may import all). The
independent ledger audit imports nothing of the ledger writer's. Imports inside functions count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
# what each top-level package may import of the project besides itself
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "simulations": {"common", "client", "server"},
}
# subpackage -> project modules it must never import (prefix match)
FORBIDDEN_WITHIN: dict[str, tuple[str, ...]] = {
    # the privacy officer's recomputation stays independent of what it checks
    "fedrad.common.audit": ("fedrad.common.privacy", "fedrad.common.protocol"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("fedrad", *parts))


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every `fedrad.*` module the file imports, at top level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedrad."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("fedrad."):
                found.add(target)
                # `from fedrad.common import privacy` imports a module by name
                found.update(
                    f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")
                )
    return found


def is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(module: str) -> str:
    return module.split(".")[1]


def violations(files: list[Path], root: Path = ROOT) -> list[str]:
    problems = []
    for path in files:
        own = module_name(path, root)
        for target in sorted(project_imports(path, root)):
            if layer(target) != layer(own) and layer(target) not in ALLOWED[layer(own)]:
                problems.append(f"{own} imports {target}")
            for sub, banned in FORBIDDEN_WITHIN.items():
                if (own == sub or own.startswith(sub + ".")) and target.startswith(banned):
                    problems.append(f"{own} imports {target}")
    return problems


def test_no_upward_or_sideways_import() -> None:
    assert violations(source_files()) == []


def probe(root: Path, folder: str, source: str) -> Path:
    path = root / folder / "probe.py"
    path.parent.mkdir(parents=True)
    path.write_text(source)
    return path


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The check itself can fail: a common module importing client, lazily, is caught."""
    bad = probe(tmp_path, "common", "def f():\n    from fedrad.client.cli import main\n")
    found = violations([bad], tmp_path)
    assert found == ["fedrad.common.probe imports fedrad.client.cli"]


@pytest.mark.parametrize(
    ("own", "source", "expected"),
    [
        ("client", "from fedrad.server import submission\n", "fedrad.server"),
        ("server", "import fedrad.client.cli\n", "fedrad.client.cli"),
        ("common/audit", "from fedrad.common.privacy.ledger import x\n", "fedrad.common.privacy"),
    ],
)
def test_sideways_imports_are_caught(tmp_path: Path, own: str, source: str, expected: str) -> None:
    found = violations([probe(tmp_path, own, source)], tmp_path)
    assert found and all(expected in line for line in found)


def test_every_package_folder_ships() -> None:
    """A folder with an __init__.py that pyproject does not list would be left out of a wheel."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {module_name(p) for p in source_files() if p.name == "__init__.py"}
    assert folders == listed


def test_coordinator_cli_and_protocol_load_without_torch() -> None:
    """The defaults and run settings they read sit in light modules: starting
    `fedrad-coordinator` must not pay for Opacus and torch."""
    probe = (
        "import sys, fedrad.server.cli, fedrad.common.protocol.run_config; "
        "print(sorted({'torch', 'opacus'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
