"""The layout rules of jaxft/ (DESIGN.md), read from the source: small modules and functions, no import cycle
(imports inside functions included), generic code that knows no family, and no `_private` jaxft name used from
outside its module."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxft"
MODULES = {
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PACKAGE.rglob("*.py"))
}
GENERIC = ("jaxft.load", "jaxft.export", "jaxft.generate", "jaxft.freeze")
FAMILY_MODULES = {m for m in MODULES if m.startswith("jaxft.models.") and m.rsplit(".", 1)[1] not in ("layers",)}
FAMILY_MODULES -= {"jaxft.models.hf_layout", "jaxft.models.decoder", "jaxft.models.lora"}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imported(module: str, path: Path) -> set[str]:
    """Every jaxft module `module` imports, at the top or inside a function."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = {f"{base}.{a.name}" for a in node.names} & MODULES.keys()
            # `from pkg import sub` needs only the submodule; `from mod import name` needs mod itself.
            out |= submodules if len(submodules) == len(node.names) else submodules | {base}
    return {m for m in out if m in MODULES and m != module}


def test_no_module_over_600_lines_and_train_under_250():
    lengths = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in lengths.items() if n > 600} == {}
    assert lengths["jaxft.train"] < 250


def test_no_function_over_80_lines():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert long == []


def test_no_import_cycle():
    graph = {m: imported(m, p) - {m} for m, p in MODULES.items()}
    cycles = []

    def visit(node, stack, done):
        if node in stack:
            cycles.append(stack[stack.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, stack + [node], done)
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        visit(m, [], done)
    assert cycles == []


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_know_no_family(module):
    path = MODULES[module]
    assert imported(module, path) & FAMILY_MODULES == set()
    source = path.read_text()
    assert "isinstance(spec" not in source and "model_type ==" not in source


def test_no_private_jaxft_name_is_used_from_outside():
    used = []
    for path in sorted([*(ROOT / "tests").glob("*.py"), *(ROOT / "bench").glob("*.py"), *PACKAGE.rglob("*.py")]):
        for node in ast.walk(tree(path)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxft"):
                used += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in {"jaxft", *(m.split(".")[-1] for m in MODULES)}:
                    if path.resolve() != MODULES.get(f"jaxft.{base.id}", Path()).resolve():
                        used.append(f"{path.name}: {base.id}.{node.attr}")
    assert used == []
