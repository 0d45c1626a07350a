"""The package's layering holds: no import points up, and no import cycle.

Every import counts: top level, under ``TYPE_CHECKING`` and inside functions
(a deferred import hides a cycle from Python, not from this test). The
layers, bottom to top, are in ``LAYERS``; within ``proxy.stages`` a stage may
import only from stages that run before it (``STAGE_ORDER``) or from itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "proxy"

# Bottom to top. Equal ranks are siblings that must not import each other.
LAYERS: dict[str, int] = {
    "config": 0,
    "core": 1,
    "stores": 2,
    "providers": 2,
    "stages": 3,
    "pipeline": 4,
    "doors": 4,
    "web": 5,
    "cli": 6,
}
STAGE_ORDER = (
    "base",
    "parse",
    "auth",
    "route",
    "admit",
    "guardrails",
    "cache",
    "semcache",
    "forward",
    "relay",
    "settle",
    "trace",
)

Graph = dict[str, set[str]]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every proxy module ``path`` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("proxy"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("proxy"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def package_graph() -> Graph:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, known) - {name} for name, path in files.items()}


def rank(module: str) -> tuple[int, int] | None:
    """(layer, stage position) of a module; None for proxy/__init__ and __main__."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in LAYERS:
        return None
    stage = -1
    if parts[1] == "stages" and len(parts) > 2:
        stage = STAGE_ORDER.index(parts[2])
    return LAYERS[parts[1]], stage


def upward_edges(graph: Graph) -> list[str]:
    bad = []
    for src, targets in graph.items():
        a = rank(src)
        if a is None:
            continue
        for dst in targets:
            b = rank(dst)
            if b is None:
                bad.append(f"{src} -> {dst}")
            elif b[0] > a[0] or (b[0] == a[0] and a[0] != LAYERS["stages"] and _sibling(src, dst)):
                bad.append(f"{src} -> {dst}")
            elif a[0] == b[0] == LAYERS["stages"] and b[1] > a[1]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def _sibling(src: str, dst: str) -> bool:
    """Two different layers of the same rank (stores and providers)."""
    return src.split(".")[1] != dst.split(".")[1]


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph(edges: Iterable[tuple[str, str]]) -> Graph:
    g: Graph = {}
    for a, b in edges:
        g.setdefault(a, set()).add(b)
        g.setdefault(b, set())
    return g


def test_no_import_points_up() -> None:
    assert upward_edges(package_graph()) == []


def test_no_import_cycle() -> None:
    assert cycles(package_graph()) == []


def test_proxy_holds_only_packages() -> None:
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]


def test_every_module_belongs_to_a_layer() -> None:
    strays = [m for m in package_graph() if rank(m) is None and m.count(".") > 0]
    assert strays == ["proxy.__main__"]


def test_the_checks_catch_what_they_are_for() -> None:
    """A synthetic graph with each kind of fault, so the checks cannot pass vacuously."""
    g = _graph(
        [
            ("proxy.core.errors", "proxy.web.app"),  # core imports web: up
            ("proxy.stores.ledger", "proxy.providers.http"),  # siblings
            ("proxy.stages.parse", "proxy.stages.relay"),  # an earlier stage imports a later one
            ("proxy.stages.relay", "proxy.stages.parse"),  # fine: later imports earlier
            ("proxy.web.app", "proxy.core.usage"),  # fine: down
            ("proxy.stages.cache.store", "proxy.stages.cache.replay"),
            ("proxy.stages.cache.replay", "proxy.stages.cache.store"),  # a cycle in one stage
        ]
    )
    assert upward_edges(g) == [
        "proxy.core.errors -> proxy.web.app",
        "proxy.stages.parse -> proxy.stages.relay",
        "proxy.stores.ledger -> proxy.providers.http",
    ]
    assert cycles(g) == [
        sorted(["proxy.stages.cache.store", "proxy.stages.cache.replay"]),
        sorted(["proxy.stages.parse", "proxy.stages.relay"]),
    ]


def test_imports_inside_functions_and_type_checking_count(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from proxy.web.keys import CONFIG\n"
        "def f():\n    from proxy.core import errors\n    import proxy.stages.relay\n"
    )
    known = {"proxy.web.keys", "proxy.core", "proxy.core.errors", "proxy.stages.relay"}
    assert imports_of(src, known) == {"proxy.web.keys", "proxy.core.errors", "proxy.stages.relay"}


def test_every_client_error_lives_in_the_one_error_module() -> None:
    """One tree: each GatewayError subclass is defined in proxy/core/errors.py,
    with its status on the class (only a provider's own error passes its
    status through)."""
    import importlib
    import pkgutil

    import proxy
    from proxy.core import errors

    for info in pkgutil.walk_packages(proxy.__path__, "proxy."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)

    def subclasses(cls: type) -> list[type]:
        return [c for s in cls.__subclasses__() for c in (s, *subclasses(s))]

    found = [c for c in subclasses(errors.GatewayError) if c.__module__.startswith("proxy.")]
    assert found, "no error classes found"
    strays = sorted(
        f"{c.__module__}.{c.__qualname__}" for c in found if c.__module__ != errors.__name__
    )
    assert strays == []
    runtime_status = [
        c.__name__ for c in found if "http_status" in vars(c) and c is not errors.ProviderHTTPError
    ]
    assert runtime_status == []
