"""The import rules of docs/architecture.md, enforced: the data of a connection flows one way.

proxy/ (control plane) -> relay/ (how bytes move) -> ebpf/ (kernel objects); observe/ (the
profiler and tracers) -> ebpf/; telemetry/ (what leaves the process) reads ebpf/ and observe/.
ebpf/ knows nothing of the rest; only ebpf/libbpf.py speaks ctypes to libbpf.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "sniproxy"

# package -> the sniproxy packages/modules it may import (itself always allowed)
ALLOWED = {
    "sniproxy.ebpf": set(),
    "sniproxy.relay": {"sniproxy.ebpf"},
    "sniproxy.observe": {"sniproxy.ebpf"},
    "sniproxy.telemetry": {"sniproxy.ebpf", "sniproxy.observe", "sniproxy.config"},
    "sniproxy.proxy": {"sniproxy", "sniproxy.config", "sniproxy.logs", "sniproxy.relay",
                       "sniproxy.telemetry", "sniproxy.observe"},
    # what a config needs from the host (capabilities, unit lines): deployment knowledge
    "sniproxy.privileges": {"sniproxy.config", "sniproxy.ebpf", "sniproxy.proxy"},
    "sniproxy.config": set(),
    "sniproxy.logs": set(),
}
# Entry points wire everything together (command-line front ends); the rules do not bind them.
ENTRY_POINTS = {"sniproxy.cli", "sniproxy.proxy.main"}
# The one module that speaks ctypes to libbpf (DESIGN.md: one ctypes boundary); the worker
# also calls libc's prctl(PR_SET_PDEATHSIG), which Python's stdlib does not offer.
CTYPES_MODULES = {"sniproxy.ebpf.libbpf", "sniproxy.proxy.worker_process"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
    return found


def _owner(module: str) -> str:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return module


def _modules():
    for path in sorted(PKG.rglob("*.py")):
        yield path, _module_name(path)


def test_every_module_belongs_to_a_ruled_package():
    unruled = [m for _, m in _modules()
               if _owner(m) not in ALLOWED and m not in ENTRY_POINTS and m != "sniproxy"
               and not m.endswith("_cli")]
    assert not unruled, f"add these to ALLOWED in tests/unit/test_architecture.py: {unruled}"


def test_imports_follow_the_one_way_flow():
    broken = []
    for path, module in _modules():
        if module in ENTRY_POINTS or module.endswith("_cli") or module == "sniproxy":
            continue
        owner = _owner(module)
        allowed = ALLOWED.get(owner, set()) | {owner}
        for name in _imports(path, module):
            if not name.startswith("sniproxy."):
                continue                  # stdlib, third party, or `sniproxy` (__version__)
            target = _owner(name)
            if target not in allowed and name not in allowed:
                broken.append(f"{module} imports {name}")
    assert not broken, "imports against docs/architecture.md:\n" + "\n".join(broken)


def test_only_libbpf_module_speaks_ctypes():
    users = [m for path, m in _modules() if "ctypes" in {n.split(".")[0] for n in _imports(path, m)}]
    assert set(users) <= CTYPES_MODULES, f"ctypes outside the one boundary: {sorted(set(users) - CTYPES_MODULES)}"

