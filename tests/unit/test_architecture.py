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



# ---- dependencies: pyproject.toml against what src/ imports ---------------------------------
import importlib.metadata  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tomllib  # noqa: E402

PYPROJECT = SRC.parent / "pyproject.toml"
# Imported by src/ but installed by a declared dependency that pins them itself.
TRANSITIVE = {
    "pydantic_core": "pydantic's core (PydanticUndefined), pinned exactly by pydantic",
    "annotated_types": "pydantic's constraint types (Ge, Le), a dependency of pydantic",
}
# Imported by src/ only when asked for, from an optional extra (never at module level).
OPTIONAL = {"uvloop": "uvloop"}


def _src_imports() -> dict[str, set[str]]:
    """Every absolute module name src/ imports -> the modules importing it."""
    found: dict[str, set[str]] = {}
    for path, module in _modules():
        for name in _imports(path, module):
            found.setdefault(name, set()).add(module)
    return found


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0]


def _provided_modules(dist: str) -> set[str]:
    names = set()
    for f in importlib.metadata.files(dist) or ():
        if f.suffix == ".py" and not str(f).startswith(("..", "/")):
            parts = list(f.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.add(".".join(parts))
    return names


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def test_every_runtime_dependency_is_imported_by_src():
    imports = set(_src_imports())
    unused = [spec for spec in _project()["dependencies"]
              if not imports & _provided_modules(_requirement_name(spec))]
    assert not unused, f"pyproject.toml dependencies that src/ never imports: {unused}"


def test_every_third_party_import_is_declared():
    declared = set()
    for spec in _project()["dependencies"]:
        declared |= {m.split(".")[0] for m in _provided_modules(_requirement_name(spec))}
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    undeclared = {}
    for name, users in _src_imports().items():
        top = name.split(".")[0]
        if top in stdlib or top == "sniproxy" or not top:
            continue
        if top not in declared and top not in TRANSITIVE and top not in OPTIONAL:
            undeclared[name] = sorted(users)
    assert not undeclared, f"imported but not in pyproject.toml dependencies: {undeclared}"


def test_uvloop_is_an_optional_extra_imported_only_when_asked_for():
    project = _project()
    assert not any(_requirement_name(s) == "uvloop" for s in project["dependencies"])
    assert any(_requirement_name(s) == "uvloop" for s in project["optional-dependencies"]["uvloop"])
    for path, module in _modules():
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:                    # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] in OPTIONAL for n in names), \
                    f"{module} imports an optional extra at module level"


# ---- errors you can branch on ---------------------------------------------------------------
# Owned by another change (the tcp_splice relay); remove once it catches OSError alone.
REDUNDANT_EXCEPT_KNOWN: set[str] = set()


def test_no_handler_lists_bpferror_next_to_oserror():
    """BpfError is an OSError: `except (BpfError, OSError)` says the same as `except OSError`."""
    found = []
    for path, module in _modules():
        if module in REDUNDANT_EXCEPT_KNOWN:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler) and isinstance(node.type, ast.Tuple):
                names = {getattr(e, "id", getattr(e, "attr", "")) for e in node.type.elts}
                if {"OSError"} <= names and names & {"BpfError", "LayoutMismatch"}:
                    found.append(f"{module}:{node.lineno}")
    assert not found, f"redundant (BpfError, OSError) handlers: {found}"


def test_errno_is_compared_by_name_never_by_number():
    """`exc.errno == 13` hides which error is meant; `errno.EACCES` says it (and the
    kernel-internal 524 is `libbpf.ENOTSUPP`, or `BpfError.not_supported`)."""
    bare = []
    for path, module in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                        and v.value.id == "errno"
                        for s in sides if isinstance(s, (ast.Tuple, ast.Set, ast.List))
                        for v in s.elts)       # (errno.ENOENT, 524): a name list with a number
            if not named and not any(isinstance(s, ast.Attribute) and s.attr == "errno"
                                     for s in sides):
                continue
            for s in sides:
                values = s.elts if isinstance(s, (ast.Tuple, ast.Set, ast.List)) else [s]
                if any(isinstance(v, ast.Constant) and isinstance(v.value, int)
                       and not isinstance(v.value, bool) and v.value != 0 for v in values):
                    bare.append(f"{module}:{node.lineno}")
    assert not bare, f"errno compared with a bare number: {bare}"


def test_bpffs_is_mounted_only_by_the_start_up_code():
    """Mounting /sys/fs/bpf is a host change: one explicit call site (relay/datapath.py, the
    kernel data path's start-up, which logs it), never a side effect of opening a map."""
    callers = set()
    for path, module in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ensure_mounted":
                callers.add(module)
    assert callers == {"sniproxy.relay.datapath"}, callers
