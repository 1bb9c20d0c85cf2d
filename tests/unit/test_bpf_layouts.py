"""Every struct and enum Python shares with a BPF program agrees with the object's BTF.

Opening an object parses its ELF and BTF without any syscall, so this needs no privilege:
a C change not mirrored in Python fails here (and at load, with the same message)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from sniproxy.ebpf.layout import EnumLayout, LayoutMismatch, StructLayout, check_layouts
from sniproxy.ebpf.objects import BpfObject, available_objects, object_path
from tests.ebpf_required import ebpf_unavailable_reason, skip_or_fail

BENCH = Path(__file__).resolve().parents[2] / "bench"

# object -> where Python describes what it reads of it (module:attribute, or a bench file)
SHARED = {
    "sni_proxy_sockmap": ["sniproxy.ebpf.sockmap:LAYOUTS"],
    "sni_proxy_tcp_splice": ["sniproxy.ebpf.tcpsplice:LAYOUTS"],
    "sni_proxy_profile": ["sniproxy.observe.profiler:LAYOUTS"],
    "sni_proxy_trace_syscalls": ["sniproxy.observe.tracing.syscalls:LAYOUTS"],
    "sni_proxy_trace_memory": ["sniproxy.observe.tracing.memory:LAYOUTS"],
    "sni_proxy_trace_tcp": ["sniproxy.observe.tracing.network:LAYOUTS",
                            "sniproxy.observe.tracing.route_metrics:LAYOUTS"],
    "sni_proxy_probe": ["sniproxy.ebpf.demo:PROBE_SLOTS"],
    "sni_proxy_xdp": ["sniproxy.ebpf.demo:XDP_SLOTS"],
    "sni_proxy_skmsg_bench": ["bench/sk_msg_vs_sk_skb.py:LAYOUTS"],
    "sni_proxy_sockstate": ["sniproxy.ebpf.sockstate:LAYOUTS"],
}
# Shared with C but not in the object's BTF, so not checked yet: each needs a one-line anchor
# in a C file another change owns (see docs/architecture.md, "Layouts shared with C").
NOT_IN_BTF: dict[str, tuple[str, ...]] = {}


@pytest.fixture(autouse=True)
def _libbpf():
    reason = ebpf_unavailable_reason()
    if reason is not None and "map" not in reason:     # opening needs libbpf, not privileges
        skip_or_fail(reason)


def _layouts(where: str) -> tuple:
    target, attr = where.rsplit(":", 1)
    if target.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(target).stem, BENCH.parent / target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    found = getattr(module, attr)
    return tuple(found) if isinstance(found, (tuple, list)) else (found,)


def _open(name: str) -> BpfObject:
    if not object_path(name).is_file():
        pytest.fail(f"{name}.bpf.o is not built: run `make bpf`")
    return BpfObject(name).open()


def test_every_built_object_has_its_layouts_described():
    built = {p.name.removesuffix(".bpf.o") for p in available_objects()}
    assert built, "no BPF object is built: run `make bpf`"
    assert built <= set(SHARED), f"objects whose shared layouts nobody checks: {built - set(SHARED)}"


@pytest.mark.parametrize("obj_name", sorted(SHARED))
def test_python_layouts_match_the_objects_btf(obj_name):
    layouts = [layout for where in SHARED[obj_name] for layout in _layouts(where)]
    assert layouts
    obj = _open(obj_name)
    try:
        check_layouts(obj._ptr, obj.name, layouts)
    finally:
        obj.close()


def test_padding_the_compiler_adds_is_described_where_c_puts_it():
    """struct tcp_event has 4 implicit pad bytes before ts_ns: "4xQ" reads it at 56."""
    from sniproxy.observe.tracing.network import EVENT_LAYOUT
    assert dict(EVENT_LAYOUT.offsets())["ts_ns"] == 56 and EVENT_LAYOUT.size == 128
    wrong = StructLayout("tcp_event", tuple(
        (n, "Q" if n == "ts_ns" else c) for n, c in EVENT_LAYOUT.members))
    with pytest.raises(LayoutMismatch, match="struct tcp_event: BTF has size 128"):
        BpfObject("sni_proxy_trace_tcp", layouts=(wrong,)).open()


def test_python_labels_are_paired_with_c_names_and_checked():
    from sniproxy.observe.tracing.syscalls import STATS_LAYOUT
    swapped = EnumLayout(STATS_LAYOUT.c_name, STATS_LAYOUT.prefix, STATS_LAYOUT.names,
                         end=STATS_LAYOUT.end, c_names=tuple(reversed(STATS_LAYOUT.c_names)))
    with pytest.raises(LayoutMismatch, match="enum sc_stat"):
        BpfObject("sni_proxy_trace_syscalls", layouts=(swapped,)).open()


def test_a_tracer_refuses_to_open_an_object_its_python_misreads():
    """The check runs where the object is opened (BpfObject(layouts=...)), not only here."""
    from sniproxy.observe.tracing.memory import ALLOC_LAYOUT
    wrong = StructLayout("mem_alloc", ALLOC_LAYOUT.members[:-1])
    with pytest.raises(LayoutMismatch, match="struct mem_alloc"):
        BpfObject("sni_proxy_trace_memory", layouts=(wrong,)).open()


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
    assert "update the Python description" in text
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
