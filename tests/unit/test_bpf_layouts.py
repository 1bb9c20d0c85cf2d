"""Every struct and enum Python shares with a BPF program agrees with the object's BTF.

Opening an object parses its ELF and BTF without any syscall, so this needs no privilege:
a C change not mirrored in Python fails here (and at load, with the same message)."""
from __future__ import annotations

import pytest

from sniproxy.ebpf import libbpf
from sniproxy.ebpf.layout import EnumLayout, LayoutMismatch, StructLayout, check_layouts
from sniproxy.ebpf.objects import BpfObject, object_path

SHARED = {
    "sni_proxy_sockmap": "sniproxy.ebpf.sockmap",
    "sni_proxy_profile": "sniproxy.observe.profiler",
}

pytestmark = pytest.mark.skipif(not libbpf.libbpf_available(), reason="libbpf.so.1 not installed")


def _open(name: str) -> BpfObject:
    if not object_path(name).is_file():
        pytest.fail(f"{name}.bpf.o is not built: run `make bpf`")
    return BpfObject(name).open()


@pytest.mark.parametrize("obj_name", sorted(SHARED))
def test_python_layouts_match_the_objects_btf(obj_name):
    import importlib
    layouts = importlib.import_module(SHARED[obj_name]).LAYOUTS
    obj = _open(obj_name)
    try:
        check_layouts(obj._ptr, obj.name, layouts)
    finally:
        obj.close()


def test_a_drifted_struct_or_enum_is_named_in_the_error():
    from sniproxy.ebpf.sockmap import CONN_LAYOUT, STATS_LAYOUT
    wrong_struct = StructLayout("sni_proxy_conn", CONN_LAYOUT.members[:-1])      # pad forgotten
    wrong_enum = EnumLayout("sni_proxy_stat_slot", "STAT_", STATS_LAYOUT.names[1:], end="STAT_MAX")
    obj = _open("sni_proxy_sockmap")
    try:
        with pytest.raises(LayoutMismatch) as info:
            check_layouts(obj._ptr, obj.name, (wrong_struct, wrong_enum))
    finally:
        obj.close()
    text = str(info.value)
    assert "struct sni_proxy_conn: BTF has size 48" in text and "Python reads size 44" in text
    assert "enum sni_proxy_stat_slot" in text and "STAT_UP_SKBS=0" in text
    assert isinstance(info.value, OSError)


def test_a_missing_type_says_how_to_anchor_it():
    obj = _open("sni_proxy_sockmap")
    try:
        with pytest.raises(LayoutMismatch, match="const volatile enum no_such_enum"):
            check_layouts(obj._ptr, obj.name, (EnumLayout("no_such_enum", "X_", ("a",)),))
    finally:
        obj.close()
