"""A hand-built profile as an OTLP ExportProfilesServiceRequest: dictionary rules, and the same
samples as the folded output, sample for sample."""
from __future__ import annotations

import gzip

from sniproxy.telemetry.folded import KERNEL_SUFFIX, fold
from sniproxy.telemetry.otlp_profiles import check_dictionary, to_otlp_request
from tests.unit.test_profile_outputs import make_profile


def _attrs(dictionary, indices) -> dict:
    out = {}
    for i in indices:
        kv = dictionary.attribute_table[i]
        v = kv.value
        out[dictionary.string_table[kv.key_strindex]] = getattr(v, v.WhichOneof("value"))
    return out


def folded_from_otlp(request) -> dict[str, int]:
    """Rebuild `comm;root;...;leaf count` lines from the OTLP request alone."""
    d = request.dictionary
    out: dict[str, int] = {}
    for rp in request.resource_profiles:
        for profile in rp.scope_profiles[0].profiles:
            for sample in profile.samples:
                a = _attrs(d, sample.attribute_indices)
                frames = []
                for li in reversed(d.stack_table[sample.stack_index].location_indices):
                    loc = d.location_table[li]
                    name = d.string_table[d.function_table[loc.lines[0].function_index].name_strindex]
                    kind = _attrs(d, loc.attribute_indices)["profile.frame.type"]
                    frames.append(name + (KERNEL_SUFFIX if kind == "kernel" else ""))
                key = ";".join([a["thread.name"], *frames])
                out[key] = out.get(key, 0) + sum(sample.values)
    return out


def test_dictionary_rules_and_profile_fields():
    profile = make_profile()
    req = to_otlp_request(profile, resource_attributes={"service.name": "svc", "deployment.environment.name": "t"})
    check_dictionary(req)
    d = req.dictionary
    assert d.string_table[0] == "" and len(d.link_table[0].trace_id) == 16
    assert len(req.resource_profiles) == 2                      # processes 2 and 100
    by_pid = {}
    for rp in req.resource_profiles:
        res = {kv.key: kv.value for kv in rp.resource.attributes}
        by_pid[res["process.pid"].int_value] = (res, rp.scope_profiles[0].profiles[0])
    res, p100 = by_pid[100]
    assert res["service.name"].string_value == "svc" and res["process.executable.name"].string_value == "app"
    assert res["deployment.environment.name"].string_value == "t" and res["host.name"].string_value
    st = d.string_table
    assert (st[p100.sample_type.type_strindex], st[p100.sample_type.unit_strindex]) == ("samples", "count")
    assert (st[p100.period_type.type_strindex], st[p100.period_type.unit_strindex]) == ("cpu", "nanoseconds")
    assert p100.period == round(1e9 / 99)
    assert p100.time_unix_nano == profile.start_time_ns and p100.duration_nano == profile.duration_ns
    assert len(p100.profile_id) == 16
    assert sum(v for s in p100.samples for v in s.values) == 107
    threads = {_attrs(d, s.attribute_indices)["thread.id"] for s in p100.samples}
    assert threads == {100, 101}
    kinds = {_attrs(d, loc.attribute_indices)["profile.frame.type"] for loc in d.location_table[1:]}
    assert kinds == {"native", "kernel"}
    # The leaf comes first in a stack: work_a's stack starts with work_a.
    names = [[st[d.function_table[d.location_table[i].lines[0].function_index].name_strindex]
              for i in d.stack_table[s.stack_index].location_indices] for s in p100.samples]
    assert ["work_a", "main", "[unknown] libc.so.6+0x29d90"] in names


def test_folded_and_otlp_agree_sample_for_sample():
    profile = make_profile()
    assert folded_from_otlp(to_otlp_request(profile)) == fold(profile)


def test_pprof_attached_when_asked():
    req = to_otlp_request(make_profile(), include_pprof=True)
    p = req.resource_profiles[0].scope_profiles[0].profiles[0]
    assert p.original_payload_format == "pprof" and gzip.decompress(p.original_payload)
    assert not to_otlp_request(make_profile()).resource_profiles[0].scope_profiles[0].profiles[0].original_payload
