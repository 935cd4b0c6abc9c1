"""The package's layering: a Ray-free bottom, imports that point one way, no cycles.

``make test`` also runs ``lint-imports`` (contracts in ``.importlinter``); these tests check the same from inside
pytest, plus what a static contract cannot see: that importing a bottom module at run time pulls in no Ray
(a package ``__init__`` that re-exported a Ray module would), and that no two modules import each other, even
lazily inside a function.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


def _contract_modules(key: str) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / ".importlinter")
    return parser.get("importlinter:contract:bottom-ray-free", key).split()


BOTTOM = _contract_modules("source_modules")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("breakhis_ray", exclude_type_checking_imports=True, cache_dir=None)


def _strongly_connected(graph) -> list[set[str]]:
    """Tarjan's algorithm over the module import graph (lazy imports included); components larger than one."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0

    def visit(root: str) -> None:  # iterative, so deep graphs cannot hit the recursion limit
        nonlocal counter
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succ = edges.get(node, [])
            if i < len(succ):
                work.append((node, i + 1))
                nxt = succ[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])

    for module in modules:
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_inside_the_package(graph):
    cycles = _strongly_connected(graph)
    assert cycles == [], f"modules that import each other (directly or through others): {cycles}"


def test_the_cycle_finder_finds_a_cycle():
    class Fake:
        modules = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(module):
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[module]

    assert _strongly_connected(Fake()) == [{"a", "b"}]


@pytest.mark.parametrize("module", BOTTOM)
def test_bottom_module_imports_no_ray_at_run_time(module):
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); print(len(bad), bad[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.startswith("0 "), f"importing {module} pulled in Ray: {out.stdout.strip()}"


def test_lint_imports_contracts_hold():
    linter = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(linter), "--no-cache"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
