"""The node's layers, as the imports show them (CONVENTIONS 1): drivers know nothing of the store, the API knows
nothing of the agent, and kind names are not re-declared on the node side.

The imports are read from the source (``ast``), not executed, and followed through every project module they reach,
so an indirect import through a helper counts too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DRIVER_PACKAGES = ("agent/compute", "agent/net", "agent/host", "agent/gpu")


def _module_file(name: str) -> Path | None:
    base = ROOT / name.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` yields ``a`` and ``a.b``)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package[: len(package) - node.level + 1]
                base = ".".join([*stem, base] if base else stem)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _reachable(start: Path) -> dict[str, str]:
    """Project modules reachable from ``start`` by imports: name -> the module that first imported it."""
    seen: dict[str, str] = {}
    visited: set[str] = set()
    todo = [(_module_name(start), start)]
    while todo:
        name, path = todo.pop()
        if name in visited:
            continue
        visited.add(name)
        for imported in _imports(path):
            if imported.split(".")[0] not in ("agent", "minicloud"):
                continue
            parts = imported.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
                prefix = ".".join(parts[:i])
                file = _module_file(prefix)
                if file is None:  # ``from a import b`` where b is a name, not a module
                    continue
                seen.setdefault(prefix, name)
                if prefix not in visited:
                    todo.append((prefix, file))
    return seen


def _files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py"))


def test_the_walker_sees_an_indirect_import():
    # agent.reconcilers.compute imports the store directly; agent.node reaches it through the reconciler.
    assert "minicloud.state" in _reachable(ROOT / "agent/node.py")


def test_drivers_import_nothing_from_the_store():
    offenders = {}
    for path in _files(*DRIVER_PACKAGES):
        reached = _reachable(path)
        state = sorted(m for m in reached if m == "minicloud.state" or m.startswith("minicloud.state."))
        if state:
            offenders[str(path.relative_to(ROOT))] = f"{state[0]} (imported by {reached[state[0]]})"
    assert offenders == {}, "drivers must not know the store; move that code to a reconciler in agent/reconcilers/"


def test_the_api_imports_nothing_from_the_agent():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imports(path) if m == "agent" or m.startswith("agent."))
        for path in _files("minicloud/api")
    }
    assert {k: v for k, v in offenders.items() if v} == {}, "compose node services in agent/node.py instead"


def test_the_node_side_declares_no_kind_names_of_its_own():
    declared = re.compile(r"^\s*[A-Z_]*KIND\s*=\s*[\"']", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in _files("agent") if declared.search(p.read_text())]
    assert offenders == [], "import kind names from where the kind is declared (e.g. minicloud/compute/kinds.py)"


#: The composition root (opens the store) and the typed app keys (name the store's type) may know the store; every
#: other API module calls services (``minicloud/<domain>/``) and never builds records or transactions itself.
API_STORE_ALLOWED = {"minicloud/api/app.py", "minicloud/api/keys.py"}


def test_api_handlers_call_services_not_the_store():
    offenders = {}
    for path in _files("minicloud/api"):
        rel = str(path.relative_to(ROOT))
        state = sorted(m for m in _imports(path) if m == "minicloud.state" or m.startswith("minicloud.state."))
        if state and rel not in API_STORE_ALLOWED:
            offenders[rel] = state
    assert offenders == {}, "move the store access into the kind's service (docs/ARCHITECTURE.md, 'Adding a kind')"


def test_services_know_no_http_server():
    """Services take a Context, never a request: no aiohttp.web, nothing of minicloud.api (aiohttp's client, to fetch
    an image or talk to etcd, is a driver concern they may use)."""
    domains = ("minicloud/core", "minicloud/compute", "minicloud/iam", "minicloud/network", "minicloud/cluster")
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(("aiohttp.web", "minicloud.api")))
        for p in _files(*domains)
    }
    assert {k: v for k, v in offenders.items() if v} == {}
