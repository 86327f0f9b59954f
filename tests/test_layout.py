"""The package layout: what installs, and which way imports go."""
import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_every_package_under_guardx_is_installed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "guardx").rglob("__init__.py")}
    assert found | {"guardx.kernels"} == listed


def test_kernels_install_as_guardx_kernels_and_import_nothing_else_of_guardx():
    import guardx.kernels

    assert Path(guardx.kernels.__file__).resolve().parent == ROOT / "kernels"
    for path in (ROOT / "kernels").glob("*.py"):
        bad = {m for m in _imports(path) if m == "kernels" or m.startswith("kernels.")
               or (m.startswith("guardx") and not m.startswith("guardx.kernels"))}
        assert not bad, f"{path.name} imports {bad}"
