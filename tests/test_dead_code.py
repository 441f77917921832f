"""
No code the library never runs: every module-level function and class under `headpag/` is used by some module of
`headpag/`, or lives in the test-oracle package `headpag.testing`, or is public API named below (and documented).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "headpag"

# Public API that the library itself does not call: each is documented (README, docs/) or a diffusers entry point.
PUBLIC_API = {
    ("headpag.eval.distribution", "FID"),  # docs/evaluation.md
    ("headpag.eval.distribution", "KID"),  # docs/evaluation.md
    ("headpag.guidance.presets", "preset_info"),  # a preset's effect and provenance, for scripts
    ("headpag.guidance.presets", "preset_names"),
    ("headpag.pipelines.guider", "HeadPerturbedAttentionGuidance"),  # docs/compatibility.md, modular pipelines
    ("headpag.runtime.hooks", "remove_hooks"),  # docs/architecture.md
    ("headpag.runtime.direct", "perturbed_forward"),  # one perturbed transformer call, for hand-written loops
    ("headpag.app", "build_app"),  # the UI from Python (docs/web-ui.md)
    ("headpag.app", "launch"),
    ("headpag.testbed", "__getattr__"),  # the package's lazy attributes (PEP 562)
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an `ImportFrom` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def unused_symbols() -> list[tuple[str, str]]:
    trees = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        trees[_module_name(path)] = (ast.parse(path.read_text()), path.name == "__init__.py")
    defined = {
        (module, node.name)
        for module, (tree, _) in trees.items()
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    # Where each imported name comes from (following package re-exports), and what each module references.
    imports: dict[tuple[str, str], tuple[str, str]] = {}
    referenced: dict[str, set[str]] = {}
    used: set[tuple[str, str]] = set()
    module_objects: dict[str, set[str]] = {}  # modules each module imports as objects (`from . import generate`)
    for module, (tree, is_package) in trees.items():
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node)
                for alias in node.names:
                    imports[(module, alias.asname or alias.name)] = (source, alias.name)
                    if f"{source}.{alias.name}" in trees:
                        module_objects.setdefault(module, set()).add(f"{source}.{alias.name}")
            elif isinstance(node, ast.Import):
                module_objects.setdefault(module, set()).update(a.name for a in node.names if a.name in trees)
            elif isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2:
                # a lazy import by name: ("headpag.testbed.judge", "ShapesJudgeAccuracy")
                if all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                    used.add((node.elts[0].value, node.elts[1].value))
        referenced[module] = names

    def origin(module: str, name: str) -> tuple[str, str]:
        seen = set()
        while (module, name) in imports and (module, name) not in seen:
            seen.add((module, name))
            module, name = imports[(module, name)]
        return module, name

    # Entry points (pyproject.toml) name their objects as "module:attribute".
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    for group in project["project"].get("entry-points", {}).values():
        for target in group.values():
            module, _, name = target.partition(":")
            used.add((module, name))
    for module, names in referenced.items():
        for name in names:
            used.add((module, name))
            if (module, name) in imports:
                used.add(origin(module, name))
            for imported in module_objects.get(module, ()):  # `generate.run(...)`, `COMMANDS[name].run(...)`
                used.add(origin(imported, name))
    return sorted(
        symbol for symbol in defined - used if not symbol[0].startswith("headpag.testing") and symbol not in PUBLIC_API
    )


def test_every_function_and_class_is_used_or_public_api():
    assert unused_symbols() == []


def test_the_check_finds_an_unused_function(tmp_path, monkeypatch):
    """The check can fail: a module with a function nobody calls is reported."""
    import shutil

    copy = tmp_path / "headpag"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("weights", "__pycache__", "*.json", "*.txt"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    (copy / "guidance" / "orphan.py").write_text("def orphan():\n    return 1\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    assert unused_symbols() == [("headpag.guidance.orphan", "orphan")]
