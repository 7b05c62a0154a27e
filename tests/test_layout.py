"""The package's folders draw its architecture: imports point down the layers only, the top holds
the foundation alone, and every module stays small enough to read in one sitting."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmggem"

LAYERS = (
    ("mmggem.errors", "mmggem.version", "mmggem.mappings", "mmggem.fileio"),  # the foundation
    ("mmggem.model", "mmggem.data"),  # the library: towers, poolers, shards
    ("mmggem.config",),  # the run config, which checks options by the library's own rules
    ("mmggem.checkpoint",),  # checkpoints, and the models a run folder holds
    ("mmggem.evaluate",),  # zero-shot and retrieval of any model (the library's last layer)
    ("mmggem.train",),  # the application: the loop and everything it drives
    ("mmggem.share", "mmggem.experiments"),  # export, cards, the ablation, notebooks, the demo
    ("mmggem.cli", "mmggem.__main__", "mmggem"),  # the command line and the package's front door
)
"""Lowest first. A module may import its own layer and those below it, never one above."""

MAX_TOP_LEVEL_MODULES = 8
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    """The layer of a module: that of the longest listed prefix of its dotted name."""
    best, found = -1, None
    for index, members in enumerate(LAYERS):
        for member in members:
            if (name == member or name.startswith(member + ".")) and len(member) > best:
                best, found = len(member), index
    assert found is not None, f"{name} belongs to no layer: add its folder to LAYERS"
    return found


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every mmggem module ``path`` imports (at the top or inside a function), with its line."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "mmggem":
                found += [(node.lineno, f"{target}.{alias.name}" if target == "mmggem" else target)
                          for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "mmggem"]
    return found


def test_imports_point_down_the_layers_only() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for line, target in imported_modules(path):
            if layer(target) > layer(source):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target}")
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    planted = PACKAGE / "model" / "_planted_upward.py"
    planted.write_text("def f():\n    from ..train import loop\n")
    try:
        source = module_name(planted)
        assert [layer(target) > layer(source) for _, target in imported_modules(planted)] == [True]
    finally:
        planted.unlink()


def test_the_top_of_the_package_holds_the_foundation_only() -> None:
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


def test_no_module_is_longer_than_one_sitting() -> None:
    long = {str(path.relative_to(PACKAGE.parent)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
