"""The code layout's rules (docs/architecture.md, "Code layout"), checked on the source.

* No service package imports another: a service imports only itself,
  ``services.common`` and ``services.providers``; those two import no service.
* No module over :data:`MAX_MODULE_LINES` lines, no function over
  :data:`MAX_FUNCTION_LINES`.
* Every service has the same rooms: ``__main__.py``, ``config.py``,
  ``server.py`` and at least one ``*_service.py``.
* Domain modules import no grpc: only the rooms that speak it
  (``__main__``, ``server``, ``peers``, ``*_service``, ``*_client``) do.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "services"
SERVICES = ("router", "budget", "cache", "audit", "discovery")
SHARED = ("common", "providers")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
GRPC_ROOMS = ("__main__", "server", "peers")


def _modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
                base = list(parts[: len(parts) - node.level + 1])
                names.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _services_imported(path: pathlib.Path) -> set[str]:
    return {
        name.split(".")[1]
        for name in _imports(path)
        if name.startswith("services.") and len(name.split(".")) > 1
    }


def _relative(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT.parent))


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_only_itself_and_the_shared_packages(service: str) -> None:
    allowed = {service, *SHARED}
    wrong = {
        _relative(path): sorted(_services_imported(path) - allowed)
        for path in _modules(service)
        if _services_imported(path) - allowed
    }
    assert wrong == {}


@pytest.mark.parametrize("package", SHARED)
def test_the_shared_packages_import_no_service(package: str) -> None:
    wrong = {
        _relative(path): sorted(_services_imported(path) & set(SERVICES))
        for path in _modules(package)
        if _services_imported(path) & set(SERVICES)
    }
    assert wrong == {}


def test_modules_and_functions_are_small() -> None:
    too_long: list[str] = []
    for path in sorted(ROOT.rglob("*.py")):
        source = path.read_text()
        lines = source.count("\n")
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{_relative(path)}: {lines} lines")
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{_relative(path)}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_the_same_rooms(service: str) -> None:
    names = {path.name for path in (ROOT / service).glob("*.py")}
    missing = {"__main__.py", "config.py", "server.py"} - names
    assert missing == set()
    assert any(name.endswith("_service.py") for name in names), names


def _speaks_grpc(path: pathlib.Path) -> bool:
    stem = path.stem
    return stem in GRPC_ROOMS or stem.endswith("_service") or stem.endswith("_client")


@pytest.mark.parametrize("service", SERVICES)
def test_domain_modules_import_no_grpc(service: str) -> None:
    wrong = [
        _relative(path)
        for path in _modules(service)
        if not _speaks_grpc(path)
        and any(name == "grpc" or name.startswith("grpc.") for name in _imports(path))
    ]
    assert wrong == []


def test_the_rules_see_a_violation(tmp_path: pathlib.Path) -> None:
    """The import reader finds the imports the rules are about (guards the guard)."""
    module = ROOT / "router" / "batch_store.py"
    assert "router" in _services_imported(module)
    assert "common" in _services_imported(module)
    probe = tmp_path / "probe.py"
    probe.write_text("import grpc\nfrom services.budget import ledger\n")
    names = {"grpc", "services.budget", "services.budget.ledger"}
    assert names <= _imports(probe)
