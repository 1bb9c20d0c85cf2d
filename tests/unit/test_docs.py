"""The documents stay true to the code: their imports import, their paths exist, and
docs/architecture.md names every module of the tree."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "sniproxy"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()

_IMPORT = re.compile(r"^\s*(from (sniproxy[\w.]*) import ([\w, ]+)|import (sniproxy[\w.]*))\s*$", re.M)


def _doc_imports():
    for doc in DOCS:
        for m in _IMPORT.finditer(doc.read_text()):
            yield doc.name, m


@pytest.mark.parametrize("doc,line", [(d, m.group(0).strip()) for d, m in _doc_imports()])
def test_every_import_in_the_docs_imports(doc, line):
    m = _IMPORT.match(line)
    module = importlib.import_module(m.group(2) or m.group(4))
    for name in filter(None, (n.strip() for n in (m.group(3) or "").split(","))):
        assert hasattr(module, name), f"{doc}: `{line}`: {module.__name__} has no {name}"


def test_the_seed_name_of_the_profiler_config_stays_importable():
    from sniproxy.observe import EbpfConfig, EbpfCpuProfiler, ProfilerConfig
    from sniproxy.observe.config import EbpfConfig as from_module
    assert EbpfConfig is ProfilerConfig is from_module and EbpfCpuProfiler.__name__ == "EbpfCpuProfiler"


def test_every_path_architecture_md_names_exists():
    missing = []
    for path in set(re.findall(r"`([\w./*-]+\.(?:py|c|h|md|json|yml|yaml|service))`", ARCHITECTURE)):
        if "*" in path:
            continue
        candidates = [ROOT / path, PKG / path, ROOT / "docs" / path]
        if not any(c.exists() for c in candidates):
            missing.append(path)
    for path in re.findall(r"\(([\w.-]+\.md)\)", ARCHITECTURE):
        if not (ROOT / "docs" / path).exists():
            missing.append(path)
    assert not missing, f"docs/architecture.md names files that do not exist: {sorted(missing)}"


def test_the_house_names_every_module():
    house = ARCHITECTURE.split("## The house", 1)[1].split("```", 2)[1]
    unnamed = [str(p.relative_to(PKG)) for p in sorted(PKG.rglob("*.py"))
               if p.name != "__init__.py" and p.name not in house
               and p.name not in {"syscall_names.py", "from_config.py"}]   # tracing internals
    assert not unnamed, f"add these to the house in docs/architecture.md: {unnamed}"
