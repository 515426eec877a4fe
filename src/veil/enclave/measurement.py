"""The simulated measurement: a hash of exactly the code the enclave runs, found from its imports.

The trusted computing base of the client enclave is every module of `veil.enclave` and `veil.privacy`
plus every veil module they import, transitively (the attestation code it speaks, the tensor format,
shared errors), together with the packages' `__init__` files that Python runs on the way. The set is
computed from the source's import statements, not listed by hand, so a new dependency cannot be
forgotten; server-side code (the verifier, the report checks, the server) is measured only if the
enclave imports it, which `tests/enclave/test_measurement.py` forbids.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import pkgutil
from pathlib import Path

ROOT_PACKAGES = ("veil.enclave", "veil.privacy")
_DOMAIN = b"veil-cmif-simulated-measurement-v2\0"


def trusted_modules(roots: tuple[str, ...] = ROOT_PACKAGES) -> dict[str, Path]:
    """Module name -> source file of everything the enclave runs (sorted by name)."""
    pending = [name for root in roots for name in _package_modules(root)]
    found: dict[str, Path] = {}
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = _source(name)
        if path is None:
            continue
        found[name] = path
        pending.extend(_parents(name))
        pending.extend(_veil_imports(name, path))
    return dict(sorted(found.items()))


def code_measurement(config_encoding: bytes) -> bytes:
    """SHA-384 over the trusted modules' names and sources and the enclave configuration (48 bytes)."""
    digest = hashlib.sha384(_DOMAIN)
    for name, path in trusted_modules().items():
        for part in (name.encode(), path.read_bytes()):
            digest.update(len(part).to_bytes(8, "little") + part)
    digest.update(len(config_encoding).to_bytes(8, "little") + config_encoding)
    return digest.digest()


def _package_modules(package: str) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ValueError(f"{package} is not a package")
    children = pkgutil.iter_modules(spec.submodule_search_locations, prefix=package + ".")
    return [package, *(info.name for info in children)]


def _source(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # `from veil.x import Name`: Name is not a module
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _veil_imports(name: str, path: Path) -> list[str]:
    """veil modules named by `import` / `from ... import` anywhere in the file (lazy imports too)."""
    is_package = path.name == "__init__.py"
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.module, node.level)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return [n for n in names if n == "veil" or n.startswith("veil.")]


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = name.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)
