"""The package layering, and the module map in ADVANCED.md."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package may import from the project: the layers import downwards only.
ALLOWED = {
    "sdxl": {"sdxl"},
    "sampling": {"sdxl", "sampling"},
    "training": {"sdxl", "sampling", "training"},
}


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_downwards_only(package):
    for path in sorted((ROOT / package).glob("*.py")):
        assert project_imports(path) <= ALLOWED[package], path.relative_to(ROOT)


def test_module_map_lists_every_module():
    advanced = (ROOT / "ADVANCED.md").read_text()
    section = advanced[advanced.index("## 0.") : advanced.index("## 1.")]
    for package in ALLOWED:
        for path in (ROOT / package).glob("*.py"):
            if path.name != "__init__.py":
                assert f"`{path.name}`" in section, f"{package}/{path.name} is not in the map"
