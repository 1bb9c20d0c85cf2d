"""OTLP profiles: a profiler `Profile` as an `ExportProfilesServiceRequest`, and its exporter.

The request is built from opentelemetry-proto's generated classes (`profiles.v1development`, proto
v1.10); the SDK has no profiles exporter. It follows what opentelemetry-ebpf-profiler sends, so
receivers that read that (the Collector with `--feature-gates=+service.profilesSupport`, Grafana
Pyroscope, OpenObserve) read this:

* one ResourceProfiles per process (`service.name`, `process.pid`, `process.executable.name`,
  `host.name`, plus the given resource attributes), one ScopeProfiles, one Profile;
* sample type `samples/count`, period type `cpu/nanoseconds`, `period` = 1e9 / Hz, the profile's
  start time and duration;
* one Sample per distinct (stack, thread): `values` = [sample count], attributes `thread.id`
  and `thread.name`;
* the shared ProfilesDictionary: string, mapping, location, function, link, attribute and stack
  tables, index 0 of each the zero value (so index 0 means "unset" everywhere); stacks leaf first;
  every location carries `profile.frame.type` (`kernel` or `native`);
* optionally the pprof of the same samples as `original_payload` (format "pprof").

    exporter = OtlpProfileExporter.from_env(endpoint="http://collector:4317")
    exporter.export(profile)                   # raises ProfileExportError, says why
"""
from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace

from sniproxy import __version__

from .otlp_common import SignalSettings, env_value, parse_headers, resolve_signal, signal_vars

SCOPE_NAME = "sniproxy.observe.profiler"
SAMPLE_TYPE = ("samples", "count")
PERIOD_TYPE = ("cpu", "nanoseconds")
FRAME_TYPE = "profile.frame.type"
CONTENT_TYPE = "application/x-protobuf"


class ProfileExportError(Exception):
    """The collector did not take the profile; the message says what happened and the fix.

    `retryable`: the OTLP specification's "may be retried" (the collector is unreachable,
    overloaded or timed out); False when resending the same request cannot succeed."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


#: gRPC codes OTLP says a client may retry (opentelemetry-proto docs/specification.md, "Failures").
RETRYABLE_GRPC = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE",
                            "UNAVAILABLE", "DATA_LOSS", "RESOURCE_EXHAUSTED"})
#: HTTP statuses OTLP/HTTP says a client may retry.
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


class _Table:
    """A dictionary table: index 0 is the zero value, equal values share one index."""

    def __init__(self, zero):
        self.items = [zero]
        self.index: dict = {}

    def add(self, key, make) -> int:
        i = self.index.get(key)
        if i is None:
            i = self.index[key] = len(self.items)
            self.items.append(make())
        return i


def _any_value(value):
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    return AnyValue(string_value=str(value))


def _key_values(attributes: Mapping[str, object]):
    from opentelemetry.proto.common.v1.common_pb2 import KeyValue
    return [KeyValue(key=k, value=_any_value(v)) for k, v in attributes.items()]


@dataclass(frozen=True)
class _SubProfile:
    """The samples of one process, shaped like a Profile for the pprof encoder."""

    samples: list
    sample_rate_hz: int
    start_time_ns: int
    duration_ns: int


def to_otlp_request(profile, *, resource_attributes: Mapping[str, object] | None = None,
                    include_pprof: bool = False, profile_ids: bool = True):
    """The ExportProfilesServiceRequest of `profile` (a sniproxy.observe.profiler.Profile)."""
    from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
        ExportProfilesServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    strings = _Table("")
    s = lambda text: strings.add(text, lambda: text)   # noqa: E731 - the string table's add
    mappings = _Table(pb.Mapping())
    functions = _Table(pb.Function())
    locations = _Table(pb.Location())
    attributes = _Table(pb.KeyValueAndUnit())
    stacks = _Table(pb.Stack())
    links = _Table(pb.Link(trace_id=bytes(16), span_id=bytes(8)))

    def attribute(key: str, value) -> int:
        return attributes.add((key, type(value).__name__, value), lambda: pb.KeyValueAndUnit(
            key_strindex=s(key), value=_any_value(value)))

    def location(frame) -> int:
        module = frame.module or ""
        mapping = mappings.add(module, lambda: pb.Mapping(filename_strindex=s(module))) if module else 0
        fkey = (frame.label, module)
        function = functions.add(fkey, lambda: pb.Function(name_strindex=s(frame.label),
                                                           system_name_strindex=s(frame.label)))
        frame_type = attribute(FRAME_TYPE, "kernel" if frame.kernel else "native")
        lkey = (module, frame.address, frame.label, frame.kernel)
        return locations.add(lkey, lambda: pb.Location(
            mapping_index=mapping, address=frame.address, lines=[pb.Line(function_index=function)],
            attribute_indices=[frame_type]))

    period = int(round(1e9 / max(profile.sample_rate_hz, 1)))
    by_process: dict[int, list] = {}
    for sample in profile.samples:
        by_process.setdefault(sample.tgid, []).append(sample)

    base = dict(resource_attributes or {})
    base.setdefault("host.name", socket.gethostname())
    resource_profiles = []
    for tgid in sorted(by_process):
        samples = by_process[tgid]
        merged: dict[tuple, int] = {}
        for sample in samples:
            # Stack: leaf first (the profiler's Sample.stack() is root first).
            stack = tuple(location(f) for f in reversed(sample.stack()))
            stack_index = stacks.add(stack, lambda: pb.Stack(location_indices=list(stack)))
            attrs = (attribute("thread.id", sample.tid), attribute("thread.name", sample.comm))
            merged[(stack_index, attrs)] = merged.get((stack_index, attrs), 0) + sample.count
        main = next((x.comm for x in samples if x.tid == tgid), samples[0].comm)
        resource = {"service.name": main, **base, "process.pid": tgid,
                    "process.executable.name": main}
        out = pb.Profile(
            sample_type=pb.ValueType(type_strindex=s(SAMPLE_TYPE[0]), unit_strindex=s(SAMPLE_TYPE[1])),
            period_type=pb.ValueType(type_strindex=s(PERIOD_TYPE[0]), unit_strindex=s(PERIOD_TYPE[1])),
            period=period, time_unix_nano=profile.start_time_ns, duration_nano=profile.duration_ns,
            samples=[pb.Sample(stack_index=stack_index, attribute_indices=list(attrs), values=[count])
                     for (stack_index, attrs), count in merged.items()],
        )
        if profile_ids:
            out.profile_id = os.urandom(16)
        if include_pprof:
            from .pprof import to_pprof
            out.original_payload_format = "pprof"
            out.original_payload = to_pprof(_SubProfile(samples, profile.sample_rate_hz,
                                                        profile.start_time_ns, profile.duration_ns))
        resource_profiles.append(pb.ResourceProfiles(
            resource=Resource(attributes=_key_values(resource)),
            scope_profiles=[pb.ScopeProfiles(scope=InstrumentationScope(name=SCOPE_NAME, version=__version__),
                                             profiles=[out])]))
    dictionary = pb.ProfilesDictionary(
        mapping_table=mappings.items, location_table=locations.items, function_table=functions.items,
        link_table=links.items, string_table=strings.items, attribute_table=attributes.items,
        stack_table=stacks.items)
    return ExportProfilesServiceRequest(resource_profiles=resource_profiles, dictionary=dictionary)


def check_dictionary(request) -> None:
    """Raise AssertionError unless the request keeps the dictionary's rules (tests, debugging)."""
    from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb
    d = request.dictionary
    assert d.string_table[0] == "", "string_table[0] must be the empty string"
    for name, zero in (("mapping_table", pb.Mapping()), ("location_table", pb.Location()),
                       ("function_table", pb.Function()), ("attribute_table", pb.KeyValueAndUnit()),
                       ("stack_table", pb.Stack())):
        assert getattr(d, name)[0] == zero, f"{name}[0] is not the zero value"
    assert d.link_table[0].trace_id.strip(b"\0") == b"" and d.link_table[0].span_id.strip(b"\0") == b""
    n = {name: len(getattr(d, name)) for name in ("string_table", "mapping_table", "location_table",
                                                   "function_table", "attribute_table", "stack_table",
                                                   "link_table")}

    def within(i: int, table: str) -> None:
        assert 0 <= i < n[table], f"index {i} out of range of {table} ({n[table]})"

    for m in d.mapping_table:
        within(m.filename_strindex, "string_table")
        for a in m.attribute_indices:
            within(a, "attribute_table")
    for f in d.function_table:
        for i in (f.name_strindex, f.system_name_strindex, f.filename_strindex):
            within(i, "string_table")
    for loc in d.location_table:
        within(loc.mapping_index, "mapping_table")
        for line in loc.lines:
            within(line.function_index, "function_table")
        for a in loc.attribute_indices:
            within(a, "attribute_table")
    for a in d.attribute_table:
        within(a.key_strindex, "string_table")
        within(a.unit_strindex, "string_table")
    for st in d.stack_table:
        for i in st.location_indices:
            assert i != 0, "a stack refers to the zero location"
            within(i, "location_table")
    for rp in request.resource_profiles:
        for sp in rp.scope_profiles:
            for p in sp.profiles:
                for vt in (p.sample_type, p.period_type):
                    within(vt.type_strindex, "string_table")
                    within(vt.unit_strindex, "string_table")
                for smp in p.samples:
                    within(smp.stack_index, "stack_table")
                    within(smp.link_index, "link_table")
                    for a in smp.attribute_indices:
                        within(a, "attribute_table")
                    assert smp.values or smp.timestamps_unix_nano, "a sample without values"


# -- export --------------------------------------------------------------------------------
class OtlpProfileExporter:
    """Sends ExportProfilesServiceRequests over gRPC (ProfilesService/Export) or HTTP
    (POST <endpoint>/v1development/profiles), with the headers and TLS settings of the
    OTEL_EXPORTER_OTLP_[PROFILES_]* variables (or the otlp config section)."""

    def __init__(self, settings: SignalSettings, environ: Mapping[str, str] | None = None):
        self.settings = settings
        environ = os.environ if environ is None else environ
        if settings.config_headers is not None:
            self.headers = dict(settings.config_headers)
        else:
            self.headers = parse_headers(env_value(environ, *signal_vars("profiles", "HEADERS"))[0] or "")
        self.certificate = env_value(environ, *signal_vars("profiles", "CERTIFICATE"))[0]
        self.client_key = env_value(environ, *signal_vars("profiles", "CLIENT_KEY"))[0]
        self.client_certificate = env_value(environ, *signal_vars("profiles", "CLIENT_CERTIFICATE"))[0]
        insecure = env_value(environ, *signal_vars("profiles", "INSECURE"))[0]
        self.insecure = (insecure or "").lower() == "true"
        self._channel = None
        self._stub = None

    @classmethod
    def from_env(cls, otlp_config=None, *, endpoint: str | None = None, protocol: str | None = None,
                 environ: Mapping[str, str] | None = None) -> "OtlpProfileExporter":
        """Settings from (highest first) the arguments, OTEL_* variables, the otlp config section."""
        return cls(resolve_signal("profiles", otlp_config, environ, protocol=protocol, endpoint=endpoint),
                   environ)

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    def export(self, profile_or_request, *, resource_attributes=None, include_pprof: bool = False) -> int:
        """Export a Profile (converted here) or a ready request; returns the bytes sent."""
        request = profile_or_request
        if not hasattr(profile_or_request, "resource_profiles"):
            request = to_otlp_request(profile_or_request, resource_attributes=resource_attributes,
                                      include_pprof=include_pprof)
        if self.settings.protocol == "grpc":
            return self._export_grpc(request)
        return self._export_http(request)

    def _read(self, path: str | None, what: str) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ProfileExportError(f"cannot read the {what} {path}: {exc.strerror}: fix "
                                     "OTEL_EXPORTER_OTLP_[PROFILES_]CERTIFICATE/CLIENT_*") from None

    def _export_grpc(self, request) -> int:
        import grpc
        from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2_grpc import (
            ProfilesServiceStub,
        )
        if self._stub is None:
            url = self.settings.endpoint
            scheme, _, rest = url.partition("://") if "://" in url else ("", "", url)
            target = rest.split("/", 1)[0]
            if scheme == "http" or (not scheme and self.insecure):
                self._channel = grpc.insecure_channel(target)
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=self._read(self.certificate, "CA certificate"),
                    private_key=self._read(self.client_key, "client key"),
                    certificate_chain=self._read(self.client_certificate, "client certificate"))
                self._channel = grpc.secure_channel(target, creds)
            self._stub = ProfilesServiceStub(self._channel)
        try:
            response = self._stub.Export(request, metadata=tuple(self.headers.items()),
                                         timeout=self.settings.effective_timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                # A new channel next time: gRPC's own reconnect backoff grows to 2 minutes while
                # a collector is down, and would keep failing fast for that long once it is up
                # (the SDK's exporters do the same).
                self.close()
            raise ProfileExportError(
                f"gRPC {exc.code().name} from {self.settings.endpoint}: {exc.details()} "
                "(is the collector up, with OTLP profiles enabled: --feature-gates=+service.profilesSupport?)",
                retryable=exc.code().name in RETRYABLE_GRPC) from None
        self._check_partial(response)
        return request.ByteSize()

    def _export_http(self, request) -> int:
        import requests
        body = request.SerializeToString()
        verify: bool | str = self.certificate or True
        cert = (self.client_certificate, self.client_key) if self.client_certificate else None
        try:
            r = requests.post(self.settings.endpoint, data=body, timeout=self.settings.effective_timeout_s,
                              headers={"Content-Type": CONTENT_TYPE, **self.headers}, verify=verify, cert=cert)
        except requests.RequestException as exc:      # unreachable, reset, timed out: transient
            raise ProfileExportError(f"POST {self.settings.endpoint} failed: {exc}", retryable=True) from None
        if r.status_code != 200:
            raise ProfileExportError(
                f"POST {self.settings.endpoint} answered {r.status_code} {r.reason}: {r.text[:200]!r} "
                "(404: the receiver has no OTLP profiles endpoint; enable the profiles feature)",
                retryable=r.status_code in RETRYABLE_HTTP)
        if r.content:
            from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
                ExportProfilesServiceResponse,
            )
            response = ExportProfilesServiceResponse()
            try:
                response.ParseFromString(r.content)
            except Exception:  # noqa: BLE001 - a non-protobuf 200 body: nothing to check
                return len(body)
            self._check_partial(response)
        return len(body)

    def _check_partial(self, response) -> None:
        partial = response.partial_success
        if partial.rejected_profiles:
            raise ProfileExportError(f"the collector rejected {partial.rejected_profiles} profile(s): "
                                     f"{partial.error_message or 'no reason given'}")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stub = None


def subset(profile, keep) -> object:
    """The same profile with only the samples `keep(sample)` accepts."""
    return replace(profile, samples=[x for x in profile.samples if keep(x)],
                   tgids=frozenset(x.tgid for x in profile.samples if keep(x)))

