"""The layer contract, read from the imports (every import, also those inside functions).

Layers, bottom up (docs/ARCHITECTURE.md):

1. ``codestream``  JPEG 2000 core
2. ``imaging``     pure compute: no Qt, no HTTP, no database
3. ``server`` the server  |  ``client`` the client library (siblings: neither imports
                   the other; they share the lower two layers and the wire format)
4. ``commands``    headless commands (no Qt)
5. ``viewer``      the Qt desktop app; its bundled mode alone starts a server
                   (``viewer`` may import ``server`` for that)

A lower layer never imports an upper one, and no two modules import each other through
any chain (no file cycles).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"codestream": 1, "imaging": 2, "server": 3, "client": 3, "commands": 4,
         "viewer": 5}
SIBLINGS = {("server", "client"), ("client", "server")}
# what each layer must never import, whatever its rank
FORBIDDEN_THIRD_PARTY = {
    "codestream": ("PySide6", "vtk", "requests", "starlette", "uvicorn", "sqlite3"),
    "imaging": ("PySide6", "requests", "starlette", "uvicorn", "sqlite3"),   # VTK renders offscreen
    "client": ("PySide6", "starlette", "uvicorn"),
    "server": ("PySide6", "requests"),
    "commands": ("PySide6",),
}


def _modules():
    out = {}
    for pkg in LAYER:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((mod, node.lineno))
            # ``from pkg import module`` imports the module too
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names
                    if f"{mod}.{a.name}" in MODULES]
    return out


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_every_package_is_covered():
    assert len(MODULES) > 50
    for pkg in LAYER:
        assert any(m.split(".")[0] == pkg for m in MODULES), pkg


def test_no_upward_or_sibling_import():
    bad = []
    for name, path in MODULES.items():
        me = _top(name)
        for mod, line in _imports(name, path):
            other = _top(mod)
            if other in LAYER and other != me:
                if me == "viewer" and other == "server":
                    continue                      # the bundled mode
                if (me, other) in SIBLINGS or LAYER[other] > LAYER[me]:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {mod}")
            for third in FORBIDDEN_THIRD_PARTY.get(me, ()):
                if other == third:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {me} imports {third}")
    assert not bad, "layer contract broken:\n" + "\n".join(bad)


def _graph():
    g = {}
    for name, path in MODULES.items():
        deps = set()
        for mod, _ in _imports(name, path):
            while mod and mod not in MODULES:
                mod = mod.rpartition(".")[0]
            if mod and mod != name and not name.startswith(mod + "."):
                # importing a package runs its __init__, not its submodules
                deps.add(mod)
        g[name] = deps
    return g


def _cycles(g):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys
    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("pkg", ["codestream", "imaging", "client", "commands"])
def test_headless_layers_import_no_qt_at_run_time(pkg):
    """Importing every module of a headless layer loads no Qt (VTK renders offscreen
    without it)."""
    import subprocess
    import sys
    mods = [m for m in MODULES if _top(m) == pkg and not m.endswith("train_sr")]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + "bad = [m for m in ('PySide6', 'shiboken6') if m in sys.modules]\n"
            + "print(','.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"{pkg} loads {r.stdout.strip()}"
