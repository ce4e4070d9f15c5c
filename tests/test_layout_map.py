"""The module map in the package docstring (:mod:`depthbench`) is the one list of the modules: every module
and subpackage under depthbench/ is in it, every entry in it exists, and a module it marks (no torch) imports
no torch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import depthbench

PACKAGE = Path(depthbench.__file__).parent
ENTRY = re.compile(r"^(?P<indent> {6}| {8})(?P<name>\S+)(?P<text>.*)$")


def _map() -> dict[str, str]:
    """Each entry of the map by its path under depthbench/ (``models/resnet.py``, ``config/``), with its text."""
    lines = depthbench.__doc__.split("    depthbench/\n", 1)[1].splitlines()
    entries: dict[str, str] = {}
    folder = ""
    for line in lines:
        found = ENTRY.match(line)
        if found is None:
            break  # the map ends at the first line that is not an entry
        name = found["name"]
        if len(found["indent"]) == 6:
            folder = name if name.endswith("/") else ""
            entries[name] = found["text"]
        else:
            assert folder, f"'{name}' is indented under no folder"
            entries[folder + name] = found["text"]
    return entries


def _modules() -> list[str]:
    """Every module and package under depthbench/, as paths relative to it; a package's __init__.py is the
    package itself (``models/``), the top package's own is this map's home."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if "__pycache__" in relative or relative == "__init__.py":
            continue
        found.append(relative.removesuffix("__init__.py"))
    return found


def _covered(module: str, entries: dict[str, str]) -> bool:
    """A module is covered by its own entry, or by its package's entry when the map lists none of that
    package's modules (a package described whole, as config/)."""
    if module in entries:
        return True
    if "/" not in module:
        return False
    folder = module.split("/", 1)[0] + "/"
    listed_inside = any(entry.startswith(folder) and entry != folder for entry in entries)
    return folder in entries and not listed_inside


def test_every_module_is_in_the_map() -> None:
    entries = _map()
    missing = [module for module in _modules() if not _covered(module, entries)]
    assert missing == [], f"add these to the module map in depthbench/__init__.py: {missing}"


def test_every_entry_of_the_map_exists() -> None:
    entries = _map()
    assert len(entries) > 30  # the whole map was read, not its first lines
    gone = [entry for entry in entries if not (PACKAGE / entry).exists()]
    assert gone == [], f"the module map names what does not exist: {gone}"


def test_a_subpackage_lists_all_of_its_modules_or_none() -> None:
    """executors/ lists each of its modules, so a new one there must be added; config/ is described whole."""
    entries = _map()
    assert "executors/timelimit.py" in entries and "models/vit.py" in entries and "bench/render.py" in entries
    assert "config/" in entries and not any(entry.startswith("config/") and entry != "config/" for entry in entries)


def _imports_at_load(module: str) -> set[str]:
    """The modules that loading ``module`` (dotted) imports itself: its top-level imports, those in class
    bodies and in top-level ``try``/``if`` blocks (not under ``TYPE_CHECKING``), never those in functions;
    with a submodule, the packages above it too."""
    path = PACKAGE.parent / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names
                             if _is_module(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body])
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return dotted.startswith("depthbench") and (path.is_dir() or path.with_suffix(".py").is_file())


def _loads_torch(module: str) -> bool:
    """Whether loading ``module`` imports torch, following depthbench's own modules at load time."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in _imports_at_load(name):
            if imported.split(".")[0] in ("torch", "torchvision"):
                return True
            if _is_module(imported):
                todo.append(imported)
    return False


def test_modules_marked_torch_free_import_no_torch() -> None:
    marked = [entry for entry, text in _map().items() if "(no torch)" in text]
    names = [f"depthbench.{entry.removesuffix('.py').removesuffix('/').replace('/', '.')}" for entry in marked]
    assert {"depthbench.errors", "depthbench.config", "depthbench.families", "depthbench.cli"} <= set(names)
    assert _loads_torch("depthbench.train") and _loads_torch("depthbench.executors.timelimit")  # the check sees torch
    heavy = [name for name in names if _loads_torch(name)]
    assert heavy == [], f"marked (no torch) in the module map but import torch when loaded: {heavy}"
