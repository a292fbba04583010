"""The layout of src/phiforge: no import cycle among its modules or its packages (imports inside functions
included), no module using another module's `_private` name or another class's `_private` attribute, nothing
setting attributes on a model from outside the model's own code, and no function longer than one screen.

Read from the source with ast (nothing is imported), so it sees every import, also the lazy ones in functions.
Modules are nodes; `from phiforge.a import b` is an edge to phiforge.a.b when that is a module, else to
phiforge.a. The package level collapses phiforge.X.* into phiforge.X (each top-level module is its own node).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "phiforge"
MAX_FUNCTION_LINES = 60  # one screen: the developers' guide

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
    assert not found, "move the code to its owner or make the name public:\n" + report(found, SRC, "phiforge")


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'file:line name N lines' for every function or method (nested ones too) longer than `limit` lines,
    counted from its first decorator (or `def`) to its last line."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                n = node.end_lineno - first + 1
                if n > limit:
                    out.append(f"{path.relative_to(root).as_posix()}:{node.lineno} {node.name} {n} lines")
    return out


def is_model(node: ast.expr) -> bool:
    """`model`, `train_model`, `self.model`, `run.lm`: an expression whose last name says it holds a model."""
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return name in ("model", "lm") or name.endswith("_model")


def attributes_set_on_models(root: Path, package: str, owners: tuple[str, ...]) -> list[str]:
    """'module:line model.attr' for each assignment to an attribute of a model outside the modules that define
    the models (`owners`: module names or package prefixes). A model takes what it needs as a constructor
    argument or through its own methods."""
    out = []
    for name, path in module_names(root, package).items():
        if any(name == o or name.startswith(o + ".") for o in owners):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and is_model(sub.value):
                        out.append(f"{name}:{node.lineno} {ast.unparse(sub)}")
    return sorted(out)


MODEL_OWNERS = ("phiforge.model", "phiforge.vision.model")


def test_no_function_is_longer_than_one_screen():
    found = long_functions(SRC)
    assert not found, f"split these functions (at most {MAX_FUNCTION_LINES} lines each):\n" + "\n".join(found)


def test_nothing_sets_attributes_on_a_model_from_outside():
    found = attributes_set_on_models(SRC, "phiforge", MODEL_OWNERS)
    assert not found, "pass it to the model's constructor or give the model a method:\n" + "\n".join(found)


def test_the_length_and_model_scans_find_what_they_look_for(tmp_path):
    """A 61-line function (decorator included) is reported and a 60-line one is not; a model's attribute set
    from another module is reported, one set in the model's own module is not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(58))
    pkg = write_package(tmp_path / "pkg", {
        "__init__.py": "",
        "long.py": f"import functools\n\n@functools.cache\ndef too_long():\n{body}    return 1\n\n\n"
                   f"def fits():\n{body}    return 1\n",
        "model.py": "class M:\n    pass\n\n\ndef build():\n    model = M()\n    model.ready = True\n",
        "user.py": "def train(model, run):\n    model.window = 8\n    run.train_model.steps += 1\n"
                   "    run.cfg.window = 8\n    self_model = 1\n",
    })
    assert long_functions(pkg) == ["long.py:4 too_long 61 lines"]
    assert attributes_set_on_models(pkg, "pkg", ("pkg.model",)) == ["pkg.user:2 model.window",
                                                                     "pkg.user:3 run.train_model.steps"]


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
