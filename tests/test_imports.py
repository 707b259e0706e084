"""No import circles among pyreplica's modules: each one imports on its own, in a fresh interpreter,
whatever was imported before it, and no module imports (even inside a function) one that imports it back."""
import ast
import itertools
import os
import subprocess
import sys

import pytest

from replication import ROOT

PACKAGE = os.path.join(ROOT, "pyreplica")
# the circles that were: cli -> daemon -> service -> cli, service <-> daemon
ORDERS = list(itertools.permutations(["pyreplica.cli", "pyreplica.daemon", "pyreplica.service"]))


def modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE) if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("order", [(m,) for m in modules()] + ORDERS, ids=lambda order: ",".join(order))
def test_each_module_imports_in_a_fresh_interpreter(order):
    names = [name if name.startswith("pyreplica.") else f"pyreplica.{name}" for name in order]
    code = "".join(f"import {name}\n" for name in names)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def imported(module):
    """pyreplica modules that `module` imports, at module level or inside a function."""
    with open(os.path.join(PACKAGE, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            # `from .x import y` imports x; `from . import x` imports the module x
            found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pyreplica."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("pyreplica."))
    return {name.split(".")[0] for name in found} & set(modules())


def find_cycle(graph):
    """A list of modules forming a cycle, or None (depth-first search)."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_among_pyreplica_modules():
    graph = {module: imported(module) for module in modules()}
    assert graph["service"] >= {"config", "replicator", "mail", "log"} and "daemon" not in graph["service"]
    assert not any("cli" in targets for targets in graph.values()), "nothing imports the command line"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_the_old_circle():
    old = {"cli": {"daemon"}, "daemon": {"service", "config"}, "service": {"cli", "config"}, "config": set()}
    assert find_cycle(old) == ["cli", "daemon", "service", "cli"]
