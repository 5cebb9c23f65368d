"""The code's shape: package layering, the library's interface (specs, not the command line), the
step chosen once, generation without training, function and script lengths, and the module maps in
README.md and ADVANCED.md."""

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "train_sdxl.py",
    "generate_images.py",
    "resume_training.py",
    "extract_lora_weights.py",
    "evaluate_dataset.py",
    "lora_tools.py",
]
LIBRARY = ("sdxl", "training", "sampling")

# What each package may import from the project: the layers import downwards only. cli (the
# command lines, torch-free) reads the torch-free modules of the layers: the choices' names, the
# errors, the specs, the data scan and the prompt files.
ALLOWED = {
    "cli": {"cli", "sdxl", "sampling", "training"},
    "sdxl": {"cli", "sdxl"},
    "sampling": {"cli", "sdxl", "sampling"},
    "training": {"cli", "sdxl", "sampling", "training"},
}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")


def imported(tree: ast.AST) -> set[str]:
    """Every module a file imports, anywhere in it (functions too), by full name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_downwards_only(package):
    for path in modules(package):
        tops = {n.split(".")[0] for n in imported(ast.parse(path.read_text()))}
        assert tops & set(ALLOWED) <= ALLOWED[package], path.relative_to(ROOT)


def test_the_library_takes_specs_not_the_command_line():
    """No module of sdxl/, training/ or sampling/ imports argparse or reads a Namespace (an `args`
    parameter or `args.` anywhere)."""
    for package in LIBRARY:
        for path in modules(package):
            tree = ast.parse(path.read_text())
            where = path.relative_to(ROOT)
            assert "argparse" not in imported(tree), where
            for node in ast.walk(tree):
                if isinstance(node, ast.arguments):  # (*args is not a Namespace)
                    named = node.posonlyargs + node.args + node.kwonlyargs
                    assert "args" not in [a.arg for a in named], f"{where}: a parameter args"
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    assert node.value.id != "args", f"{where}:{node.lineno} reads args."


def test_nothing_assigns_to_a_trainer_after_construction():
    """The Trainer is frozen, and no code anywhere sets an attribute of one (`tr.x = ...`)."""
    from training.train_loop import DeviceStep, Trainer

    assert Trainer.__dataclass_params__.frozen and DeviceStep.__dataclass_params__.frozen
    files = [p for d in (*ALLOWED, "tests", "bench") for p in (ROOT / d).glob("*.py")]
    for path in files + [ROOT / s for s in SCRIPTS]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else []
            targets += [node.target] if isinstance(node, ast.AugAssign | ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name):
                    assert t.value.id not in ("tr", "trainer"), f"{path.name}:{node.lineno}"
    with pytest.raises(dataclasses.FrozenInstanceError):
        object.__new__(Trainer).__setattr__("micro_step", None)


def imports_in_subprocess(statements: list[str]) -> set[str]:
    """The modules loaded by running the import statements in a fresh interpreter."""
    code = "; ".join(statements + ["import sys, json", "print(json.dumps(sorted(sys.modules)))"])
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_generation_imports_no_training_module():
    """Every import generate_images.py makes, at the top or in its functions, loads no module of
    training/ (and only the command line's modules before its flags are checked load no torch)."""
    tree = ast.parse((ROOT / "generate_images.py").read_text())
    loaded = imports_in_subprocess([f"import {name}" for name in sorted(imported(tree))])
    assert "sampling.inference" in loaded and "sdxl.checkpoint" in loaded  # what it runs
    assert not [m for m in loaded if m == "training" or m.startswith("training.")]


def test_the_command_lines_are_torch_free():
    loaded = imports_in_subprocess(
        ["import cli.train", "import cli.generate", "import cli.evaluate", "import cli.lora_tools"]
        + ["import train_sdxl", "import generate_images", "import evaluate_dataset"]
        + ["import lora_tools"]
    )
    assert "cli.train" in loaded and "torch" not in loaded


def function_lengths(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.name}")
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "build_parser"
    ]


def test_functions_and_the_training_script_are_short():
    """At most 100 lines a function (the argument parsers' builders aside) in the scripts and the
    packages, and train_sdxl.py at most 300 lines: each reads in one sitting."""
    paths = [ROOT / s for s in SCRIPTS] + [p for d in ALLOWED for p in modules(d)]
    longest = max(n for p in paths for n in function_lengths(p))
    assert longest[0] <= 100, longest
    assert len((ROOT / "train_sdxl.py").read_text().splitlines()) <= 300


def test_module_maps_list_every_module():
    advanced = (ROOT / "ADVANCED.md").read_text()
    section = advanced[advanced.index("## 0.") : advanced.index("## 1.")]
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 1)]
    for package in ALLOWED:
        for path in modules(package):
            assert f"`{path.name}`" in section, f"{package}/{path.name} is not in ADVANCED.md's map"
            assert (
                f"{package}/{path.name}" in layout or f"`{path.name}`" in layout
            ), f"{package}/{path.name} is not in README.md's Layout"


def test_no_reference_outside_the_repository():
    """Nothing the repository ships points at a file outside it (../shared/...)."""
    files = [p for d in (*ALLOWED, "bench", "tests") for p in (ROOT / d).glob("*.py")]
    files += [ROOT / s for s in SCRIPTS] + [ROOT / "README.md", ROOT / "ADVANCED.md"]
    for path in files:
        if path.name != "test_layout.py":
            assert "../shared/" not in path.read_text(), path.name
