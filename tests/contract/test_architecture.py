"""The package layout holds: no import cycles, a framework-free core, no private names across modules.

Imports are read from the source (ast), module-level and inside functions alike: a lazy import is
still a dependency, and a cycle through one is still a cycle. Only `if TYPE_CHECKING:` blocks are
left out, since they never run.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "bnfold"
FRAMEWORKS = {"onnx", "onnxruntime", "onnxscript", "torch", "torchvision", "tensorflow", "keras", "tf2onnx",
              "tf_keras", "jax", "timm"}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(mod: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = mod.split(".") if _is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Imports(ast.NodeVisitor):
    """(imported module, imported name or None, line) for every runtime import, and the names bound to
    bnfold modules (for `module._private` attribute reads)."""

    def __init__(self, mod: str) -> None:
        self.mod = mod
        self.found: list[tuple[str, str | None, int]] = []
        self.module_aliases: dict[str, str] = {}

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for n in node.orelse:
                self.visit(n)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.found.append((a.name, None, node.lineno))
            if a.asname and a.name in MODULES:
                self.module_aliases[a.asname] = a.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        src = _resolve(self.mod, node.level, node.module)
        if src == "__future__":
            return
        for a in node.names:
            sub = f"{src}.{a.name}"
            if sub in MODULES:  # `from . import ondisk`: the submodule itself
                self.found.append((sub, None, node.lineno))
                self.module_aliases[a.asname or a.name] = sub
            else:
                self.found.append((src, a.name, node.lineno))


def _imports(mod: str) -> _Imports:
    v = _Imports(mod)
    v.visit(ast.parse(MODULES[mod].read_text(), str(MODULES[mod])))
    return v


IMPORTS = {m: _imports(m) for m in MODULES}


def _edges() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, v in IMPORTS.items():
        for target, _, _ in v.found:
            if target in MODULES and target != m and not _is_package(target):
                out[m].add(target)
    return out


def test_there_is_no_import_cycle():
    edges = _edges()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer,allowed", [("bnfold.core", ("bnfold.core",)),
                                           ("bnfold.verify", ("bnfold.core", "bnfold.verify"))])
def test_core_and_verify_import_no_framework(layer, allowed):
    bad = []
    for m, v in IMPORTS.items():
        if m != layer and not m.startswith(layer + "."):
            continue
        for target, _, line in v.found:
            top = target.split(".")[0]
            if top in FRAMEWORKS:
                bad.append(f"{m}:{line} imports {target}")
            elif top == "bnfold" and not any(target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{m}:{line} imports {target} (outside {', '.join(allowed)})")
    assert not bad, "\n".join(bad)


def test_framework_packages_stay_apart():
    """bnfold.onnx needs no torch/keras; bnfold.torch and bnfold.keras never import each other."""
    forbidden = {"bnfold.onnx": {"torch", "tensorflow", "keras", "bnfold.torch", "bnfold.keras"},
                 "bnfold.torch": {"tensorflow", "keras", "bnfold.keras"},
                 "bnfold.keras": {"bnfold.torch"}}
    bad = []
    for pkg, no in forbidden.items():
        for m, v in IMPORTS.items():
            if not m.startswith(pkg + "."):
                continue
            for target, _, line in v.found:
                if any(target == f or target.startswith(f + ".") for f in no):
                    bad.append(f"{m}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_frontends_import_their_framework_only_when_used():
    """The registry imports every frontend module to find an owner: none may import its framework at the top."""
    bad = []
    for m in ("bnfold.onnx.frontend", "bnfold.torch.frontend", "bnfold.keras.frontend", "bnfold.api", "bnfold.cli",
              "bnfold"):
        tree = ast.parse(MODULES[m].read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [_resolve(m, node.level, node.module)] if isinstance(node, ast.ImportFrom) else [])
            for n in names:
                if n.split(".")[0] in FRAMEWORKS or n.startswith(("bnfold.onnx.", "bnfold.torch.", "bnfold.keras.")) \
                        and not n.endswith(".frontend"):
                    bad.append(f"{m}: module-level import of {n}")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module_border():
    bad = []
    for m, v in IMPORTS.items():
        for target, name, line in v.found:
            if target.startswith("bnfold") and name and name.startswith("_") and not name.startswith("__"):
                bad.append(f"{m}:{line} imports {name} from {target}")
        tree = ast.parse(MODULES[m].read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in v.module_aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{m}:{node.lineno} reads {node.value.id}.{node.attr} of {v.module_aliases[node.value.id]}")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_the_whole_package():
    """The checks above are only as good as the walk: it must find the packages and their imports."""
    assert {"bnfold.core.kernel", "bnfold.onnx.folder", "bnfold.torch.fold", "bnfold.keras.plan"} <= set(MODULES)
    assert "bnfold.core.kernel" in _edges()["bnfold.onnx.folder"]
    assert any(t == "torch" for t, _, _ in IMPORTS["bnfold.torch.fold"].found)


def test_modules_stay_small():
    """A file over ~400 lines is usually two concepts (house rule); a little slack for docstrings."""
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 450}
    assert not big, big
