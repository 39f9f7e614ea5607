"""The library under the CLI: no module of relinker imports the command line."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relinker"


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_below_the_cli_imports_it():
    # entry.py sits above the CLI: it starts it
    below = [p for p in PACKAGE.glob("*.py") if p.name not in ("cli.py", "__main__.py", "entry.py")]
    assert len(below) > 10
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "relinker.cli" or m.startswith("relinker.cli."))
                 for p in below}
    assert {name: mods for name, mods in offenders.items() if mods} == {}
