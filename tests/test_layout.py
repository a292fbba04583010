"""The layout of src/phiforge: no import cycle among its modules or its packages (imports inside functions
included), and no module using another module's `_private` name or another class's `_private` attribute.

Read from the source with ast (nothing is imported), so it sees every import, also the lazy ones in functions.
Modules are nodes; `from phiforge.a import b` is an edge to phiforge.a.b when that is a module, else to
phiforge.a. The package level collapses phiforge.X.* into phiforge.X (each top-level module is its own node).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "phiforge"

# Violations in the trainer side's files (train/, vision/, litgpt/pretrain.py), which another branch is reworking
# (issue 24's trainer part). The coordinator removes this set when the trainer side lands: from then on every
# violation fails. The test also fails on an entry here that no longer occurs.
PENDING_TRAINER_SIDE: set[str] = set()

NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package at `root`."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class ModuleScan(ast.NodeVisitor):
    """One module's imports (edges to modules of the package) and its uses of private names."""

    def __init__(self, name: str, path: Path, modules: dict[str, Path]):
        self.name, self.modules = name, modules
        self.is_package = path.name == "__init__.py"
        self.edges: dict[str, int] = {}  # imported module -> first line
        self.bound: dict[str, str] = {}  # local name -> the module (of the package) it is bound to
        self.foreign: set[str] = set()  # local names bound to modules outside the package
        self.private: list[str] = []
        self.classes: list[set[str]] = []  # private attributes each enclosing class defines
        self.tree = ast.parse(path.read_text(encoding="utf-8"), str(path))

    def run(self) -> ModuleScan:
        for node in ast.walk(self.tree):  # bindings first: a name may be used above its (lazy) import
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.record_import(node)
        self.visit(self.tree)
        return self

    def internal(self, dotted: str) -> bool:
        return dotted in self.modules

    def base_of(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        here = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        return ".".join(here + ([node.module] if node.module else []))

    def edge(self, target: str, line: int) -> None:
        if target != self.name:
            self.edges.setdefault(target, line)

    def record_import(self, node) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if self.internal(alias.name):
                    self.edge(alias.name, node.lineno)
                    self.bound[alias.asname or alias.name.split(".")[0]] = \
                        alias.name if alias.asname else alias.name.split(".")[0]
                else:
                    self.foreign.add(alias.asname or alias.name.split(".")[0])
            return
        base = self.base_of(node)
        for alias in node.names:
            local = alias.asname or alias.name
            full = f"{base}.{alias.name}"
            if self.internal(full):
                self.edge(full, node.lineno)
                self.bound[local] = full
            elif self.internal(base):
                self.edge(base, node.lineno)
                if is_private(alias.name):
                    self.private.append(f"{self.name}:{node.lineno} imports {base}.{alias.name}")
            else:
                self.foreign.add(local)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        own = set()
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_private(sub.name):
                own.add(sub.name)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and is_private(sub.attr):
                own.add(sub.attr)
            elif isinstance(sub, (ast.Name, ast.AnnAssign)):
                target = sub.target if isinstance(sub, ast.AnnAssign) else sub
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store) and is_private(target.id):
                    own.add(target.id)
        self.classes.append(own)
        self.generic_visit(node)
        self.classes.pop()

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if is_private(node.attr) and node.attr not in NAMEDTUPLE_API:
            self.check_private(node)
        self.generic_visit(node)

    def check_private(self, node: ast.Attribute) -> None:
        chain, root = [], node.value
        while isinstance(root, ast.Attribute):
            chain.append(root.attr)
            root = root.value
        if not isinstance(root, ast.Name):
            where = "an expression"
        else:
            if root.id in self.foreign:
                return  # another library's private name: not this test's business
            if root.id in self.bound:
                owner = ".".join([self.bound[root.id], *reversed(chain)])
                while owner not in self.modules:  # `phiforge.a.b.C._x`: the module is phiforge.a.b
                    owner = owner.rsplit(".", 1)[0]
                if owner != self.name:
                    self.private.append(f"{self.name}:{node.lineno} uses {owner}.{node.attr}")
                return
            if root.id in ("self", "cls") and not chain:
                return
            where = root.id
        if any(node.attr in own for own in self.classes):
            return  # another instance of the class that defines it
        self.private.append(f"{self.name}:{node.lineno} uses {node.attr} of {where}")


def scan_package(root: Path, package: str) -> dict[str, ModuleScan]:
    modules = module_names(root, package)
    return {name: ModuleScan(name, path, modules).run() for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def unit(module: str, package: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == package and len(parts) > 1 else module


def violations(root: Path, package: str) -> set[str]:
    scans = scan_package(root, package)
    graph = {name: set(s.edges) for name, s in scans.items()}
    packages: dict[str, set[str]] = {}
    for name, targets in graph.items():
        for t in targets:
            if unit(t, package) != unit(name, package):
                packages.setdefault(unit(name, package), set()).add(unit(t, package))
    module_cycles = cycles(graph)
    found = {f"module cycle: {', '.join(c)}" for c in module_cycles}
    found |= {f"package cycle: {', '.join(c)}" for c in cycles(packages) if c not in module_cycles}
    for s in scans.values():
        found |= {f"private: {p}" for p in s.private}
    return found


def imports_between(root: Path, package: str, members: list[str]) -> list[str]:
    """The imports that make a cycle of `members` (modules, or packages at the package level), with their lines."""
    out = set()
    for name, s in scan_package(root, package).items():
        for target, line in s.edges.items():
            a, b = (name, target) if name in members else (unit(name, package), unit(target, package))
            if a in members and b in members and a != b:
                out.add(f"  {name}:{line} imports {target}")
    return sorted(out)


def report(found: set[str], root: Path, package: str) -> str:
    lines = []
    for v in sorted(found):
        lines.append(v)
        if " cycle: " in v:
            lines += imports_between(root, package, v.split(": ", 1)[1].split(", "))
    return "\n".join(lines)


def test_no_import_cycle_and_no_private_name_used_across_modules():
    found = violations(SRC, "phiforge")
    new = found - PENDING_TRAINER_SIDE
    assert not new, "move the code to its owner or make the name public:\n" + report(new, SRC, "phiforge")
    gone = PENDING_TRAINER_SIDE - found
    assert not gone, f"fixed: remove from PENDING_TRAINER_SIDE: {sorted(gone)}"


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_scan_finds_cycles_and_private_names(tmp_path):
    """A synthetic package with one of each problem: every one is reported, and nothing else."""
    pkg = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "a.py": "from pkg import b\n",  # a -> b -> a, b's import inside a function
        "b.py": "def f():\n    from pkg.a import thing\n    return thing\n",
        "low/__init__.py": "",
        "low/x.py": "def g():\n    import pkg.high.y\n",  # package cycle low -> high -> low, no module cycle
        "high/__init__.py": "",
        "high/y.py": "from pkg.low import z\n",
        "low/z.py": "",
        "c.py": "from pkg.d import _hidden\nimport pkg.d as dee\nfrom . import d\n"
                "v = dee._other + d._third\n",
        "d.py": "_hidden = _other = _third = 1\n\nclass W:\n    def __init__(self):\n        self._file = None\n",
        "e.py": "class R:\n    def __init__(self, w):\n        self._own = 1\n        w._file.flush()\n"
                "    def same(self, other):\n        return other._own\n",  # another R's own attribute is fine
        "f.py": "import os\nfrom pkg.d import W\nos._exit\nW.__init__\n",  # other libraries', dunders: fine
    })
    found = violations(pkg, "pkg")
    assert found == {
        "module cycle: pkg.a, pkg.b",
        "package cycle: pkg.high, pkg.low",
        "private: pkg.c:1 imports pkg.d._hidden",
        "private: pkg.c:4 uses pkg.d._other",
        "private: pkg.c:4 uses pkg.d._third",
        "private: pkg.e:4 uses _file of w",
    }, report(found, pkg, "pkg")
    assert imports_between(pkg, "pkg", ["pkg.high", "pkg.low"]) == ["  pkg.high.y:1 imports pkg.low.z",
                                                                    "  pkg.low.x:2 imports pkg.high.y"]
