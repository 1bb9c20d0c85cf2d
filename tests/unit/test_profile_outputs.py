"""Profile outputs from a hand-built profile: folded stacks, pprof, flame graph SVG, top-N."""
from __future__ import annotations

import errno
import gzip
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from sniproxy.observe.profiler import Profile, ProfileStats, Sample, stack_map_entries
from sniproxy.observe.symbolize import Frame, KernelSymbols
from sniproxy.telemetry.flamegraph import build_tree, render_flamegraph
from sniproxy.telemetry.folded import fold, format_folded, parse_folded
from sniproxy.telemetry.pprof import encode_profile, to_pprof


def u(name, module="app", addr=0x1000, offset=0x10):
    return Frame(name, module, addr, offset, False)


def k(name, addr=0xFFFFFFFF81000000):
    return Frame(name, "[kernel.kallsyms]", addr, 0x20, True)


MAIN, WORK_A, WORK_B = u("main", addr=0x1000), u("work_a", addr=0x2000), u("work_b", addr=0x3000)
UNKNOWN = Frame(None, "libc.so.6", 0x7F0000001234, 0x29D90, False)


def make_profile() -> Profile:
    samples = [
        # leaf-first tuples, as the stack map stores them
        Sample(100, 100, "app", 70, (WORK_A, MAIN, UNKNOWN), ()),
        Sample(100, 101, "app", 30, (WORK_B, MAIN, UNKNOWN), ()),
        Sample(100, 100, "app", 5, (u("write"), MAIN), (k("ksys_write"), k("entry_SYSCALL_64")), 0),
        Sample(2, 2, "kthreadd", 3, (), (k("worker_thread"),), 0, errno.EFAULT),
        Sample(100, 100, "app", 2, (MAIN,), (), errno.EEXIST, 0),
    ]
    stats = ProfileStats(samples=110, user_only=102, kernel_only=3, kernel_stack_collisions=2)
    return Profile(samples, stats, sample_rate_hz=99, start_time_ns=1_700_000_000_000_000_000,
                   duration_ns=2_000_000_000, cpus=2, target="all processes")


# -- profile model ------------------------------------------------------------------------
def test_stack_is_root_first_with_lost_and_kernel_frames():
    p = make_profile()
    assert [f.label for f in p.samples[0].stack()] == [
        "[unknown] libc.so.6+0x29d90", "main", "work_a"]
    assert [f.label for f in p.samples[2].stack()] == [
        "main", "write", "entry_SYSCALL_64", "ksys_write"]
    # A kernel thread has no user stack (EFAULT): nothing is invented.
    assert [f.label for f in p.samples[3].stack()] == ["worker_thread"]
    # A collision loses the kernel stack but the sample still counts, under a marker.
    assert [f.label for f in p.samples[4].stack()] == [
        "main", "[lost kernel stack: stack map collision]"]


def test_unknown_frame_label_never_empty():
    assert Frame(None, "", 0xDEAD, 0xDEAD, False).label == "[unknown] 0xdead"
    assert UNKNOWN.label == "[unknown] libc.so.6+0x29d90"


def test_top_functions_and_shares():
    p = make_profile()
    top = p.top_functions(3)
    assert (top[0].name, top[0].self_samples) == ("work_a", 70)
    assert (top[1].name, top[1].self_samples) == ("work_b", 30)
    assert p.total_samples == 110
    assert p.function_share("main", tgid=100) == 1.0
    assert p.function_share("work_a", tgid=100) == pytest.approx(70 / 107)
    assert p.samples_of(2) == 3


def test_stats_totals():
    s = make_profile().stats
    assert s.collisions == 2 and s.lost == 2


def test_stack_map_sizing_is_bounded_power_of_two():
    assert stack_map_entries(1) == 1024
    assert stack_map_entries(10_000) == 16384
    assert stack_map_entries(16384) == 16384
    assert stack_map_entries(1_000_000) == 65536


# -- folded -------------------------------------------------------------------------------
def test_folded_format():
    text = format_folded(fold(make_profile()))
    lines = text.splitlines()
    assert "app;[unknown] libc.so.6+0x29d90;main;work_a 70" in lines
    assert "app;main;write;entry_SYSCALL_64_[k];ksys_write_[k] 5" in lines
    assert "kthreadd;worker_thread_[k] 3" in lines
    assert lines == sorted(lines)
    assert parse_folded(text) == fold(make_profile())


def test_folded_merges_threads_and_escapes_separators():
    p = make_profile()
    p.samples.append(Sample(100, 102, "app", 1, (u("a;b"), MAIN), ()))
    stacks = fold(p)
    assert stacks["app;main;a:b"] == 1
    # tids 100 and 101 both ran main;work_* stacks: one line each function, not per thread
    assert sum(1 for s in stacks if s.endswith("work_a")) == 1
    assert fold(p, include_pid=True)["app-100;main;a:b"] == 1


def test_parse_folded_rejects_garbage():
    with pytest.raises(ValueError, match="line 2"):
        parse_folded("a;b 1\nno-count-here\n")


# -- pprof --------------------------------------------------------------------------------
def _profile_message_class():
    """profile.proto (github.com/google/pprof) as a descriptor, independent of our encoder."""
    f = descriptor_pb2.FileDescriptorProto(name="profile_test.proto", package="perftools.profiles",
                                           syntax="proto3")
    T = descriptor_pb2.FieldDescriptorProto
    def msg(name, *fields):
        m = f.message_type.add(name=name)
        for fname, num, ftype, repeated, type_name in fields:
            fd = m.field.add(name=fname, number=num, type=ftype,
                             label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL)
            if type_name:
                fd.type_name = ".perftools.profiles." + type_name
    I64, U64, STR, MSG, BOOL = T.TYPE_INT64, T.TYPE_UINT64, T.TYPE_STRING, T.TYPE_MESSAGE, T.TYPE_BOOL
    msg("Profile", ("sample_type", 1, MSG, True, "ValueType"), ("sample", 2, MSG, True, "Sample"),
        ("mapping", 3, MSG, True, "Mapping"), ("location", 4, MSG, True, "Location"),
        ("function", 5, MSG, True, "Function"), ("string_table", 6, STR, True, None),
        ("drop_frames", 7, I64, False, None), ("keep_frames", 8, I64, False, None),
        ("time_nanos", 9, I64, False, None), ("duration_nanos", 10, I64, False, None),
        ("period_type", 11, MSG, False, "ValueType"), ("period", 12, I64, False, None),
        ("comment", 13, I64, True, None), ("default_sample_type", 14, I64, False, None))
    msg("ValueType", ("type", 1, I64, False, None), ("unit", 2, I64, False, None))
    msg("Sample", ("location_id", 1, U64, True, None), ("value", 2, I64, True, None),
        ("label", 3, MSG, True, "Label"))
    msg("Label", ("key", 1, I64, False, None), ("str", 2, I64, False, None),
        ("num", 3, I64, False, None), ("num_unit", 4, I64, False, None))
    msg("Mapping", ("id", 1, U64, False, None), ("memory_start", 2, U64, False, None),
        ("memory_limit", 3, U64, False, None), ("file_offset", 4, U64, False, None),
        ("filename", 5, I64, False, None), ("build_id", 6, I64, False, None),
        ("has_functions", 7, BOOL, False, None))
    msg("Location", ("id", 1, U64, False, None), ("mapping_id", 2, U64, False, None),
        ("address", 3, U64, False, None), ("line", 4, MSG, True, "Line"),
        ("is_folded", 5, BOOL, False, None))
    msg("Line", ("function_id", 1, U64, False, None), ("line", 2, I64, False, None))
    msg("Function", ("id", 1, U64, False, None), ("name", 2, I64, False, None),
        ("system_name", 3, I64, False, None), ("filename", 4, I64, False, None),
        ("start_line", 5, I64, False, None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("perftools.profiles.Profile"))


def test_pprof_decodes_with_the_protobuf_runtime():
    profile = make_profile()
    data = to_pprof(profile)
    assert data[:2] == b"\x1f\x8b"
    msg = _profile_message_class().FromString(gzip.decompress(data))
    st = list(msg.string_table)
    assert st[0] == ""
    assert [(st[t.type], st[t.unit]) for t in msg.sample_type] == [
        ("samples", "count"), ("cpu", "nanoseconds")]
    assert (st[msg.period_type.type], msg.period) == ("cpu", 1_000_000_000 // 99)
    assert msg.duration_nanos == 2_000_000_000 and msg.time_nanos == profile.start_time_ns
    functions = {f.id: st[f.name] for f in msg.function}
    locations = {loc.id: functions[loc.line[0].function_id] for loc in msg.location}
    mappings = {m.id: st[m.filename] for m in msg.mapping}
    assert {"[kernel.kallsyms]", "app", "libc.so.6"} <= set(mappings.values())
    decoded = []
    for s in msg.sample:
        labels = {st[lb.key]: (st[lb.str] if lb.str else lb.num) for lb in s.label}
        decoded.append(([locations[i] for i in s.location_id], list(s.value), labels))
    # leaf first, values = (count, count x period)
    assert decoded[0] == (["work_a", "main", "[unknown] libc.so.6+0x29d90"],
                          [70, 70 * (1_000_000_000 // 99)], {"pid": 100, "tid": 100, "comm": "app"})
    assert decoded[2][0] == ["ksys_write", "entry_SYSCALL_64", "write", "main"]
    assert sum(v[1][0] for v in decoded) == profile.total_samples


def test_pprof_locations_are_shared_between_samples():
    msg = _profile_message_class().FromString(encode_profile(make_profile()))
    st = list(msg.string_table)
    names = [st[f.name] for f in msg.function]
    assert names.count("main") == 1
    keys = [(loc.mapping_id, loc.address, loc.line[0].function_id) for loc in msg.location]
    assert len(keys) == len(set(keys))
    # main appears in 4 samples but is one location per distinct address
    assert sum(1 for loc in msg.location if st[msg.function[loc.line[0].function_id - 1].name] == "main") == 1
    assert len(set(st)) == len(st)  # the string table has no duplicates


# -- flame graph --------------------------------------------------------------------------
SVG_NS = "{http://www.w3.org/2000/svg}"


def _frames(svg: str):
    root = ET.fromstring(svg.encode())
    out = {}
    for g in root.iter(SVG_NS + "g"):
        title = g.find(SVG_NS + "title")
        rect = g.find(SVG_NS + "rect")
        if title is not None and rect is not None:
            out[title.text] = rect
    return root, out


def test_flamegraph_is_valid_svg_with_proportional_frames():
    stacks = fold(make_profile())
    svg = render_flamegraph(stacks, title="burn <test> & co", subtitle="99 Hz")
    root, frames = _frames(svg)
    assert root.tag == SVG_NS + "svg"
    titles = list(frames)
    assert any(t.startswith("all (110 samples, 100.00%)") for t in titles)
    a = next(r for t, r in frames.items() if t.startswith("work_a ("))
    b = next(r for t, r in frames.items() if t.startswith("work_b ("))
    assert float(a.get("width")) / float(b.get("width")) == pytest.approx(70 / 30, rel=0.01)
    assert "work_a (70 samples, 63.64%)" in titles
    # kernel frames are coloured apart (orange), user frames warm
    kfill = next(r for t, r in frames.items() if t.startswith("ksys_write_[k]")).get("fill")
    r, g, _ = map(int, re.findall(r"\d+", kfill))
    assert r >= 220 and 110 <= g <= 170
    assert "burn &lt;test&gt; &amp; co" in svg


def test_flamegraph_is_interactive():
    svg = render_flamegraph({"a;b": 3, "a;c": 1})
    for needle in ("function zoom(", "function unzoom(", "function search(", "Reset Zoom",
                   'id="search"', "<title>", "fg:x=", "fg:w="):
        assert needle in svg


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_flamegraph_script_parses(tmp_path):
    svg = render_flamegraph({"a;b": 3, "a;c": 1})
    script = svg.split("<![CDATA[", 1)[1].split("]]>", 1)[0]
    path = tmp_path / "fg.js"
    path.write_text(script)
    result = subprocess.run(["node", "--check", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_flamegraph_drops_invisible_frames_but_keeps_their_samples():
    stacks = {"a;big": 1_000_000, "a;tiny": 1}
    _, frames = _frames(render_flamegraph(stacks))
    assert not any(t.startswith("tiny") for t in frames)
    assert any(t.startswith("a (1,000,001 samples") for t in frames)


def test_flamegraph_tree_and_empty_profile():
    tree = build_tree({"a;b;c": 2, "a;b": 1, "x": 0})
    assert tree.value == 3 and tree.children["a"].children["b"].value == 3
    _, frames = _frames(render_flamegraph({}))
    assert list(frames) == ["all (0 samples, 0.00%)"]


# -- kernel symbols -----------------------------------------------------------------------
def test_kernel_symbols_from_a_kallsyms_file(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text(
        "ffffffff81000000 T _stext\n"
        "ffffffff81000100 T do_syscall_64\n"
        "ffffffff81000200 t helper\n"
        "ffffffff81000300 D some_data\n"
        "ffffffffc0000000 t ext4_fn\t[ext4]\n"
    )
    ks = KernelSymbols(str(path))
    f = ks.frame(0xFFFFFFFF81000105)
    assert (f.name, f.offset, f.module) == ("do_syscall_64", 5, "[kernel.kallsyms]")
    assert ks.frame(0xFFFFFFFF81000310).name == "helper"  # data symbols are skipped
    assert ks.frame(0xFFFFFFFFC0000010).module == "[ext4]"
    assert ks.frame(0x10).label.startswith("[unknown] [kernel.kallsyms]")
    assert ks.memory_bytes > 0


def test_kernel_symbols_hidden_addresses(tmp_path):
    path = tmp_path / "kallsyms"
    path.write_text("0000000000000000 T _stext\n0000000000000000 T do_syscall_64\n")
    f = KernelSymbols(str(path)).frame(0xFFFFFFFF81000105)
    assert f.name is None and f.label.startswith("[unknown]")
