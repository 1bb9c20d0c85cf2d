"""The config.json schema: loading, validation, and errors that point at the JSON path.

Every problem in a config file becomes one line of a `ConfigError`, in the form

    config.json: routes[2].backend: got 'x': expected "host:port" or "$sni:port" (e.g. "10.0.0.5:443")

so a user sees where (the JSON path), what they wrote, and what would be accepted. All problems
are reported at once, not one per run. The reference for every key is docs/configuration.md.
"""

from __future__ import annotations

import difflib
import encodings.idna
import ipaddress
import json
import re
import types
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union

import annotated_types
from pydantic_core import PydanticUndefined
from pydantic import (
    AfterValidator,
    PlainValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "Backend",
    "Config",
    "ConfigError",
    "DnsCacheMapConfig",
    "SockmapConfig",
    "StatsConfig",
    "ConfigProblem",
    "DnsConfig",
    "EbpfConfig",
    "HostPort",
    "LogConfig",
    "OtlpConfig",
    "ProfilingConfig",
    "RelayConfig",
    "RouteConfig",
    "Socks5Upstream",
    "Timeouts",
    "DIRECT",
    "DEFAULT_ROUTE_NAME",
    "load_config",
    "normalize_hostname",
    "parse_backend",
    "parse_config",
    "parse_hostport",
]

DIRECT = "direct"
"""The upstream name meaning "connect to the backend ourselves"; reserved, cannot be redefined."""

DEFAULT_ROUTE_NAME = "default_backend"
"""Route name (metric label) of connections sent to `default_backend`; reserved for routes."""

SNI_PLACEHOLDER = "$sni"

# A config with 10k routes is ~1 MB; anything near this bound is a wrong file, not a config.
MAX_CONFIG_BYTES = 64 * 1024 * 1024
# Regexes run on every connection that reaches them; a very long one is a mistake or a hazard.
MAX_REGEX_CHARS = 4096
# RFC 1035: 253 characters in presentation form (255 octets on the wire), 63 per label.
MAX_HOSTNAME_CHARS = 253
MAX_LABEL_CHARS = 63
# Values shown after "got" are cut here so one bad 10 kB string doesn't flood the terminal.
MAX_SHOWN_CHARS = 80

BACKEND_EXPECTED = 'expected "host:port" or "$sni:port" (e.g. "10.0.0.5:443")'
# Letters, digits, '_' (seen in real internal names) and inner '-'.
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?\Z")
_UPSTREAM_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class ConfigProblem:
    """One problem: where (JSON path, "" for the whole file) and what (human text)."""

    path: str
    message: str

    def render(self, source: str) -> str:
        return f"{source}: {self.path}: {self.message}" if self.path else f"{source}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used. `str()` is one line per problem, each prefixed by the source."""

    def __init__(self, problems: list[ConfigProblem], source: str = "config.json") -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(p.render(self.source) for p in self.problems)


class _CrossFieldProblems(Exception):
    """Raised from inside model validation (deliberately not a ValueError, so pydantic lets it
    through unwrapped) to carry problems that involve several keys, each with its own path."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__(problems)
        self.problems = problems


def _show(value: Any) -> str:
    """How a bad value is quoted after "got": Python repr for strings, JSON for the rest."""
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=repr)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 3] + "..."
    return text


def _got(value: Any, expected: str) -> str:
    return f"got {_show(value)}: {expected}"


# --------------------------------------------------------------------------------------------
# Addresses and host names


class HostPort(NamedTuple):
    """A parsed address. `host` is an IP address in canonical form (IPv6 without brackets) or a
    lower-case A-label host name."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.is_ipv6 else f"{self.host}:{self.port}"


def normalize_hostname(name: str) -> str:
    """Lower-case A-label form of a host name, one trailing dot removed; ValueError if invalid.

    U-labels are IDNA-encoded (`bücher.example` -> `xn--bcher-kva.example`) with Python's IDNA
    codec. Labels may hold letters, digits, '-' (not first or last) and '_'.
    """
    if not isinstance(name, str):
        raise ValueError("expected a host name string")
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise ValueError("the host name is empty")
    if text.isascii():
        labels = text.lower().split(".")
    else:
        labels = []
        for label in encodings.idna.dots.split(text):
            if not label:
                raise ValueError("the host name has an empty label ('..')")
            try:
                labels.append(encodings.idna.ToASCII(label).decode("ascii").lower())
            except UnicodeError as exc:
                raise ValueError(f"label {label!r} is not a valid internationalised name ({exc})") from None
    for label in labels:
        if not label:
            raise ValueError("the host name has an empty label ('..' or a leading '.')")
        if len(label) > MAX_LABEL_CHARS:
            raise ValueError(f"label {label[:20]!r}... is longer than {MAX_LABEL_CHARS} characters")
        if not _LABEL_RE.match(label):
            raise ValueError(
                f"label {label!r} may only hold letters, digits, '_' and '-' (not at its start or end)"
            )
    result = ".".join(labels)
    if len(result) > MAX_HOSTNAME_CHARS:
        raise ValueError(f"the host name is longer than {MAX_HOSTNAME_CHARS} characters")
    return result


def _split_hostport(text: str) -> tuple[str, str]:
    """Split "host:port" / "[v6]:port" into its two strings; ValueError naming the defect."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("the '[' of an IPv6 address is never closed")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError("the port is missing after ']' (write \"[::1]:443\")")
        try:
            if not isinstance(ipaddress.ip_address(host), ipaddress.IPv6Address):
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} inside [] is not an IPv6 address") from None
        return host, rest[1:]
    if text.count(":") > 1:
        raise ValueError('an IPv6 address needs brackets around it, e.g. "[::1]:443"')
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("the port is missing")
    return host, port


def _parse_port(text: str, *, allow_zero: bool) -> int:
    lowest = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit() or len(text) > 5 or not lowest <= int(text) <= 65535:
        raise ValueError(f"the port must be a number from {lowest} to 65535")
    return int(text)


def _normalize_host(host: str) -> str:
    """Canonical IP address text, or a normalised host name."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return normalize_hostname(host)
    except ValueError as exc:
        raise ValueError(f"{host!r} is not an IP address or a valid host name: {exc}") from None


def parse_hostport(
    text: str,
    *,
    what: str = "an address",
    example: str = "10.0.0.5:443",
    allow_port_zero: bool = False,
) -> HostPort:
    """Parse "1.2.3.4:443", "[::1]:443" or "name:443" into a HostPort.

    Raises ValueError whose text reads `expected <what> as "host:port" (e.g. "<example>"); <why>`.
    Port 0 ("pick a free port") only with allow_port_zero, meant for listen addresses in tests.
    """
    expected = f'expected {what} as "host:port" (e.g. "{example}")'
    if not isinstance(text, str):
        raise ValueError(expected)
    try:
        host, port_text = _split_hostport(text)
        if not host:
            raise ValueError("the host is empty (to listen on every address use 0.0.0.0 or [::])")
        port = _parse_port(port_text, allow_zero=allow_port_zero)
        return HostPort(_normalize_host(host), port)
    except ValueError as exc:
        raise ValueError(f"{expected}; {exc}") from None


@dataclass(frozen=True)
class Backend:
    """Where a route sends connections: a fixed host, or the SNI itself (`dynamic`)."""

    host: str | None  # None for "$sni:port": the host is the client's SNI
    port: int

    @property
    def dynamic(self) -> bool:
        return self.host is None

    def __str__(self) -> str:
        if self.host is None:
            return f"{SNI_PLACEHOLDER}:{self.port}"
        return str(HostPort(self.host, self.port))


def parse_backend(text: str) -> Backend:
    """Parse "host:port" or "$sni:port"; ValueError starting with the BACKEND_EXPECTED text."""
    if not isinstance(text, str):
        raise ValueError(BACKEND_EXPECTED)
    if text.lower().startswith(SNI_PLACEHOLDER):
        rest = text[len(SNI_PLACEHOLDER) :]
        if not rest.startswith(":"):
            raise ValueError(f'{BACKEND_EXPECTED}; "$sni" must be followed by ":port", e.g. "$sni:443"')
        try:
            return Backend(None, _parse_port(rest[1:], allow_zero=False))
        except ValueError as exc:
            raise ValueError(f"{BACKEND_EXPECTED}; {exc}") from None
    try:
        host, port_text = _split_hostport(text)
        if not host:
            raise ValueError("the host is empty")
        port = _parse_port(port_text, allow_zero=False)
        return Backend(_normalize_host(host), port)
    except ValueError as exc:
        raise ValueError(f"{BACKEND_EXPECTED}; {exc}") from None


# --------------------------------------------------------------------------------------------
# Field validators (return the normalised value or raise ValueError("expected ..."))


def _check_listen_addr(value: str) -> str:
    return str(
        parse_hostport(value, what="a listen address", example="0.0.0.0:8443", allow_port_zero=True)
    )


def _check_metrics_addr(value: str) -> str:
    return str(
        parse_hostport(value, what="an HTTP listen address", example="127.0.0.1:9090", allow_port_zero=True)
    )


def _check_plain_addr(value: str) -> str:
    return str(parse_hostport(value, what="the SOCKS5 server", example="127.0.0.1:1080"))


MAX_WORKERS = 256


def _check_workers(value: Any) -> int | str:
    if value == "auto" or (type(value) is int and 1 <= value <= MAX_WORKERS):
        return value
    raise ValueError(f'expected an integer from 1 to {MAX_WORKERS}, or "auto" (enough workers for '
                     "max_connections under the fd limit)")


def _check_backend(value: str) -> str:
    return str(parse_backend(value))


def _check_nameserver(value: str) -> str:
    """A resolver address: an IP ("1.1.1.1", "::1") or IP and port ("[::1]:5353")."""
    expected = 'expected an IP address or "ip:port" (e.g. "1.1.1.1", "[2606:4700::1111]:53")'
    try:
        return str(HostPort(str(ipaddress.ip_address(value)), 53))
    except ValueError:
        pass
    try:
        hp = parse_hostport(value, what="an IP address", example="1.1.1.1:53")
        return str(HostPort(str(ipaddress.ip_address(hp.host)), hp.port))
    except ValueError:
        raise ValueError(f"{expected}; name servers must be IP addresses, not names") from None


def _check_match(value: str) -> str:
    """Route match: exact name, "*.suffix" wildcard, or "~regex"; returns the normalised form."""
    expected = 'expected a host name, "*.suffix" or "~regex" (e.g. "a.example.com", "*.example.org")'
    if value.startswith("~"):
        pattern = value[1:]
        if not pattern:
            raise ValueError(f'{expected}; the regex after "~" is empty (use "~." to match any name)')
        if len(pattern) > MAX_REGEX_CHARS:
            raise ValueError(f"{expected}; the regex is longer than {MAX_REGEX_CHARS} characters")
        try:
            re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"invalid regular expression after '~': {exc}") from None
        return value
    if value.startswith("*."):
        rest, prefix = value[2:], "*."
    else:
        rest, prefix = value, ""
    if "*" in rest:
        raise ValueError(
            f"{expected}; '*' is only allowed as the whole first label (\"*.example.org\"); "
            'for other patterns use a regex route ("~^api-[0-9]+\\\\.example\\\\.net$")'
        )
    try:
        return prefix + normalize_hostname(rest)
    except ValueError as exc:
        raise ValueError(f"{expected}; {exc}") from None


def _check_name(value: str) -> str:
    if not value or len(value) > 128 or not value.isprintable():
        raise ValueError("expected a printable name of 1 to 128 characters")
    return value


def _check_credential(value: str) -> str:
    # RFC 1929: ULEN and PLEN are single octets and must be at least 1.
    size = len(value.encode("utf-8"))
    if not 1 <= size <= 255:
        raise ValueError(f"expected 1 to 255 bytes (RFC 1929 limit); this is {size} bytes in UTF-8")
    return value


def _check_abs_path(value: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError('expected an absolute path (e.g. "/sys/fs/bpf/sni-proxy")')
    return value


def _check_file_path(value: str) -> str:
    if not value or "\0" in value:
        raise ValueError('expected a file path (e.g. "/var/log/sni-proxy.log")')
    return value


# --------------------------------------------------------------------------------------------
# Schema. Strict types: "5" is not a number and 1 is not `true` in this file.

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
ListenAddr = Annotated[Str, AfterValidator(_check_listen_addr)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _hint(expected: str, default: Any = PydanticUndefined) -> Any:
    """A field whose error messages say `expected <expected>` instead of the derived type text."""
    return Field(default=default, json_schema_extra={"expected": expected})


class Timeouts(_Model):
    client_hello_s: Annotated[float, Strict(), Field(gt=0, le=300)] = 5.0
    connect_s: Annotated[float, Strict(), Field(gt=0, le=300)] = 5.0
    idle_s: Annotated[float, Strict(), Field(gt=0, le=7 * 86400)] = 300.0
    dns_s: Annotated[float, Strict(), Field(gt=0, le=60)] = 5.0
    shutdown_grace_s: Annotated[float, Strict(), Field(ge=0, le=3600)] = 30.0


class SockmapConfig(_Model):
    enabled: Bool = True
    max_entries: Annotated[int, Strict(), Field(ge=2, le=1 << 24)] = 65536
    max_inflight_bytes: Annotated[int, Strict(), Field(ge=64 * KiB, le=1 * GiB)] = 64 * MiB
    backpressure: Bool = True
    sndbuf_bytes: Annotated[int, Strict(), Field(ge=4 * KiB, le=1 * GiB)] | None = None


class DnsCacheMapConfig(_Model):
    enabled: Bool = True
    max_entries: Annotated[int, Strict(), Field(ge=1, le=1 << 24)] = 10000
    pin_path: Annotated[Str, AfterValidator(_check_abs_path)] | None = _hint(
        'an absolute path on a bpffs mount (e.g. "/sys/fs/bpf/sni-proxy")', "/sys/fs/bpf/sni-proxy"
    )


class StatsConfig(_Model):
    enabled: Bool = True


class TracingConfig(_Model):
    # Kernel-measured TCP figures per route on /metrics (connect latency, failures by reason,
    # retransmits, RTT at close) for the proxy's own sockets; docs/tracing.md states the cost.
    network: Bool = False


class TcpSpliceConfig(_Model):
    """ebpf.tcp_splice: the kernel TCP splice in tc (relay/tcpsplice.py)."""

    enabled: Bool = True
    # Interfaces to attach the tc programs to; null: every interface of the proxy's network
    # namespace that is up (which covers the listen addresses and every route), lo included.
    interfaces: tuple[Annotated[Str, Field(min_length=1, max_length=15)], ...] | None = None
    max_flows: Annotated[int, Strict(), Field(ge=1, le=1 << 22)] = 16384
    # How long a finished flow's entries stay (TIME_WAIT-like): a FIN retransmitted because
    # the last ACK was lost must still be translated. 10 s covers five retransmissions at
    # the minimum RTO; a later one meets the proxy's stack, whose RST ends a connection whose
    # data were all delivered. Not Linux's 60 s TIME_WAIT: that guards a new connection on
    # the same tuple against old segments, which the BPF program handles at the new SYN, and
    # each lingering flow holds a flow slot (16,384 slots / 60 s: 273 new connections a
    # second at most; / 10 s: 1,638).
    linger_s: Annotated[float, Strict(), Field(ge=0, le=600)] = 10.0
    # A directory on bpffs where the flow maps are pinned: a proxy started after the previous
    # one was killed (SIGKILL, crash) takes over its live flows instead of resetting them.
    # null: not pinned. bpffs is one per host, not per network namespace: one directory per
    # proxy instance.
    pin_path: Annotated[Str, AfterValidator(_check_abs_path)] | None = None
    # Read each socket's state at the hand-over with a BPF getsockopt program attached to the
    # proxy's cgroup (one system call per socket) instead of TCP_REPAIR (ten or more); off,
    # or where it cannot load (kernel < 6.2, no CAP_PERFMON, no cgroup v2): TCP_REPAIR.
    bpf_socket_state: Bool = True


class EbpfConfig(_Model):
    enabled: Bool = False
    sockmap: SockmapConfig = SockmapConfig()
    dns_cache: DnsCacheMapConfig = DnsCacheMapConfig()
    stats: StatsConfig = StatsConfig()
    tracing: TracingConfig = TracingConfig()
    tcp_splice: TcpSpliceConfig = TcpSpliceConfig()


class DnsConfig(_Model):
    nameservers: (
        Annotated[tuple[Annotated[Str, AfterValidator(_check_nameserver)], ...], Field(min_length=1, max_length=8)]
        | None
    ) = _hint('a list of IP addresses or "ip:port" (e.g. ["1.1.1.1", "[2606:4700::1111]:53"])', None)
    min_ttl_s: Annotated[int, Strict(), Field(ge=0, le=86400)] = 5
    max_ttl_s: Annotated[int, Strict(), Field(ge=1, le=7 * 86400)] = 3600
    negative_ttl_s: Annotated[int, Strict(), Field(ge=0, le=3600)] = 5
    cache_size: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] = 10000


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["plain", "json"] = "plain"
    file: Annotated[Str, AfterValidator(_check_file_path)] | None = _hint(
        'a file path (e.g. "/var/log/sni-proxy.log"); null logs to stderr', None
    )
    access_log: Bool = True


class RelayConfig(_Model):
    mode: Literal["auto", "splice", "copy"] = "auto"
    buffer_bytes: Annotated[int, Strict(), Field(ge=4 * KiB, le=16 * MiB)] = 64 * KiB



# --------------------------------------------------------------------------------------------
# OpenTelemetry: the `otlp` and `profiling` sections (issue 13; docs/opentelemetry.md)

# RFC 9110 token characters: what an HTTP header (and a gRPC metadata key) name may hold.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: Header values are credentials as often as not: they are never echoed in errors or /status.
HIDDEN = "<hidden>"


def _check_otlp_endpoint(value: str) -> str:
    expected = 'expected an http:// or https:// URL of the collector (e.g. "http://127.0.0.1:4317")'
    try:
        url = urllib.parse.urlsplit(value)
        port = url.port          # ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"{expected}; {exc}") from None
    if url.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{expected}; the scheme says plain (http) or TLS (https)")
    if not url.hostname:
        raise ValueError(f"{expected}; the host is missing")
    if port == 0:
        raise ValueError(f"{expected}; the port must be a number from 1 to 65535")
    return value.rstrip("/")


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME_RE.match(value):
        raise ValueError("expected an HTTP header name (letters, digits and !#$%&'*+.^_`|~-)")
    return value.lower()    # gRPC metadata keys must be lower case; HTTP does not care


def _check_header_value(value: str) -> str:
    if any(c in value for c in "\r\n\0") or len(value) > 8192:
        raise ValueError("expected a header value without CR, LF or NUL, at most 8192 characters")
    return value


def _check_profiling_targets(value: Any) -> Any:
    expected = ('expected "self" (the proxy\'s own processes), a list of process ids '
                '(e.g. [1234, 5678]) or "cgroup:/sys/fs/cgroup/<path>"')
    if value == "self":
        return value
    if isinstance(value, str) and value.startswith("cgroup:"):
        path = value[len("cgroup:"):]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"{expected}; the cgroup path must be absolute")
        return value
    if isinstance(value, (list, tuple)) and value:
        if len(value) > 64:
            raise ValueError(f"{expected}; at most 64 pids (the profiler's pid filter size)")
        if all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in value):
            return tuple(value)
    raise ValueError(expected)


HeaderName = Annotated[Str, AfterValidator(_check_header_name)]
HeaderValue = Annotated[Str, AfterValidator(_check_header_value)]


class OtlpConfig(_Model):
    """OTLP export of the proxy's metrics; every key is overridden by its OTEL_* variable."""

    enabled: Bool = False
    endpoint: Annotated[Str, AfterValidator(_check_otlp_endpoint)] | None = _hint(
        'an http:// or https:// URL of the collector (e.g. "http://127.0.0.1:4317"), or null for '
        "the SDK default (localhost:4317 for grpc, localhost:4318 for http/protobuf)", None)
    protocol: Literal["grpc", "http/protobuf"] = "grpc"
    headers: Annotated[dict[HeaderName, HeaderValue], Field(max_length=64)] = {}
    interval_s: Annotated[float, Strict(), Field(ge=0.1, le=86400)] = 60.0
    timeout_s: Annotated[float, Strict(), Field(gt=0, le=300)] = 10.0
    temporality: Literal["cumulative", "delta", "lowmemory"] = "cumulative"
    resource: Annotated[dict[Str, Str], Field(max_length=128)] = {}


class ProfilingConfig(_Model):
    """Continuous CPU profiling of the proxy itself (sniproxy.observe.continuous)."""

    enabled: Bool = False
    environment: Literal["production", "development", "debug"] = "production"
    export_interval_s: Annotated[float, Strict(), Field(ge=1, le=86400)] = 60.0
    max_samples: Annotated[int, Strict(), Field(ge=1, le=1_000_000)] | None = _hint(
        "an integer from 1 to 1000000, or null for the environment's default", None)
    targets: Annotated[Any, AfterValidator(_check_profiling_targets)] = _hint(
        '"self", a list of process ids (e.g. [1234]) or "cgroup:/sys/fs/cgroup/<path>"', "self")
    otlp: Bool = True
    pprof_dir: Annotated[Str, AfterValidator(_check_abs_path)] | None = _hint(
        'an absolute directory path (e.g. "/var/lib/sni-proxy/profiles"), or null', None)
    retention: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 24
    # OTLP export of profiles: profiles waiting while the collector is down or slow, and how
    # many times one is sent before it is given up (both counted in sniproxy_otlp_dropped_total).
    export_queue: Annotated[int, Strict(), Field(ge=1, le=1_000)] = 16
    export_attempts: Annotated[int, Strict(), Field(ge=1, le=100)] = 8


class Socks5Upstream(_Model):
    type: Literal["socks5"]
    addr: Annotated[Str, AfterValidator(_check_plain_addr)] = _hint('"host:port" of the SOCKS5 proxy (e.g. "127.0.0.1:1080")')
    username: Annotated[Str, AfterValidator(_check_credential)] | None = _hint("a string of 1 to 255 bytes", None)
    password: Annotated[Str, AfterValidator(_check_credential)] | None = _hint("a string of 1 to 255 bytes", None)

    @property
    def address(self) -> HostPort:
        return parse_hostport(self.addr)


class RouteConfig(_Model):
    match: Annotated[Str, AfterValidator(_check_match)] = _hint(
        'a host name, "*.suffix" or "~regex" (e.g. "a.example.com", "*.example.org", "~^api-[0-9]+\\.example\\.net$")'
    )
    backend: Annotated[Str, AfterValidator(_check_backend)] = _hint(BACKEND_EXPECTED.removeprefix("expected "))
    upstream: Str = _hint(f'"{DIRECT}" or the name of an entry in "upstreams"', DIRECT)
    proxy_protocol: Literal["v1", "v2"] | None = None
    allow_private: Bool = False
    name: Annotated[Str, AfterValidator(_check_name)] | None = _hint("a printable name of 1 to 128 characters", None)

    @property
    def kind(self) -> Literal["exact", "wildcard", "regex"]:
        if self.match.startswith("~"):
            return "regex"
        return "wildcard" if self.match.startswith("*.") else "exact"

    @property
    def route_name(self) -> str:
        """Metric label: the explicit name, else the (normalised) match string."""
        return self.name if self.name is not None else self.match

    @property
    def target(self) -> Backend:
        return parse_backend(self.backend)


class Config(_Model):
    listen_addr: Annotated[tuple[ListenAddr, ...], Field(min_length=1, max_length=64)] = _hint(
        'a "host:port" string or a list of 1 to 64 of them (e.g. "0.0.0.0:8443", ["0.0.0.0:8443", "[::]:8443"])',
        ("0.0.0.0:8443",),
    )
    listen_backlog: Annotated[int, Strict(), Field(ge=1, le=65535)] = 4096
    listen_defer_accept: Annotated[bool, Strict()] = True
    # false: refuse to start when another process listens on a listen_addr (SO_REUSEPORT would
    # silently split the traffic with it); true: share the port on purpose (both need it).
    listen_reuse_port_shared: Annotated[bool, Strict()] = False
    max_connections: Annotated[int, Strict(), Field(ge=1, le=10_000_000)] = 50000
    # "auto": sniproxy.proxy.capacity picks enough workers for max_connections under the fd limit.
    workers: Annotated[Union[int, Literal["auto"]], PlainValidator(_check_workers)] = 1
    metrics_addr: Annotated[Str, AfterValidator(_check_metrics_addr)] | None = _hint(
        '"host:port" of the HTTP endpoint (e.g. "127.0.0.1:9090"), or null to disable it', "127.0.0.1:9090"
    )
    routes: tuple[RouteConfig, ...] = ()
    default_backend: Annotated[Str, AfterValidator(_check_backend)] | None = _hint(
        'a fixed "host:port" (e.g. "10.0.0.5:443"), or null to refuse unmatched names', None
    )
    upstreams: dict[Str, Socks5Upstream] = {}
    timeouts: Timeouts = Timeouts()
    dns: DnsConfig = DnsConfig()
    relay: RelayConfig = RelayConfig()
    log: LogConfig = LogConfig()
    ebpf: EbpfConfig = EbpfConfig()
    otlp: OtlpConfig = OtlpConfig()
    profiling: ProfilingConfig = ProfilingConfig()
    fallback_mode: Literal["auto", "strict"] = "auto"

    @field_validator("listen_addr", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = _cross_field_problems(self)
        if problems:
            raise _CrossFieldProblems(problems)
        return self

    @property
    def listen(self) -> tuple[HostPort, ...]:
        return tuple(parse_hostport(a, allow_port_zero=True) for a in self.listen_addr)

    @property
    def metrics(self) -> HostPort | None:
        return None if self.metrics_addr is None else parse_hostport(self.metrics_addr, allow_port_zero=True)

    def ebpf_requested(self) -> dict[str, bool]:
        """Which eBPF features the user asks for (before the kernel has its say)."""
        on = self.ebpf.enabled
        return {
            "sockmap": on and self.ebpf.sockmap.enabled,
            "dns_cache": on and self.ebpf.dns_cache.enabled,
            "stats": on and self.ebpf.stats.enabled,
            "tcp_splice": on and self.ebpf.tcp_splice.enabled,
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready view for /status and logs; SOCKS5 credentials are never included."""
        data = self.model_dump(mode="json")
        data["routes"] = [
            {"name": r.route_name, **r.model_dump(mode="json", exclude={"name"})} for r in self.routes
        ]
        data["upstreams"] = {
            name: {"type": u.type, "addr": u.addr, "auth": u.username is not None}
            for name, u in self.upstreams.items()
        }
        data["otlp"]["headers"] = {name: HIDDEN for name in self.otlp.headers}
        return data


def _cross_field_problems(cfg: Config) -> list[ConfigProblem]:
    """Checks that involve more than one key; each problem carries its own JSON path."""
    problems: list[ConfigProblem] = []
    for name in cfg.upstreams:
        if name == DIRECT:
            problems.append(
                ConfigProblem(
                    f"upstreams.{name}",
                    f'"{DIRECT}" is reserved (it means connecting without a proxy); pick another name',
                )
            )
        elif not _UPSTREAM_NAME_RE.match(name):
            problems.append(
                ConfigProblem(
                    _json_path(("upstreams", name)),
                    f"bad upstream name {_show(name)}: expected 1-64 letters, digits, '_', '.', '-' "
                    "starting with a letter or digit",
                )
            )
        upstream = cfg.upstreams[name]
        if (upstream.username is None) != (upstream.password is None):
            missing = "password" if upstream.password is None else "username"
            problems.append(
                ConfigProblem(
                    _json_path(("upstreams", name, missing)),
                    "missing: SOCKS5 username and password go together (give both or neither)",
                )
            )
    defined = ", ".join(sorted(n for n in cfg.upstreams if n != DIRECT)) or "none"
    first_seen: dict[str, int] = {}
    name_seen: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        if route.upstream != DIRECT and route.upstream not in cfg.upstreams:
            problems.append(
                ConfigProblem(
                    f"routes[{i}].upstream",
                    _got(
                        route.upstream,
                        f'expected "{DIRECT}" or the name of an entry in "upstreams" (defined: {defined})',
                    ),
                )
            )
        if route.match in first_seen:
            problems.append(
                ConfigProblem(
                    f"routes[{i}].match",
                    _got(
                        route.match,
                        f"the same match as routes[{first_seen[route.match]}].match, so this route "
                        "could never be chosen; remove one of them",
                    ),
                )
            )
        else:
            first_seen[route.match] = i
        label = route.route_name
        if route.name is not None and route.name == DEFAULT_ROUTE_NAME:
            problems.append(
                ConfigProblem(
                    f"routes[{i}].name",
                    _got(route.name, f'"{DEFAULT_ROUTE_NAME}" is reserved for the default backend; pick another name'),
                )
            )
        elif label in name_seen and route.match != cfg.routes[name_seen[label]].match:
            # Blame the route whose explicit "name" caused the clash (a default name is the match).
            earlier = name_seen[label]
            blamed, other = (i, earlier) if route.name is not None else (earlier, i)
            problems.append(
                ConfigProblem(
                    f"routes[{blamed}].name",
                    _got(label, f"already the name of routes[{other}]; route names label metrics and must be unique"),
                )
            )
        else:
            name_seen.setdefault(label, i)
    if cfg.default_backend is not None and cfg.default_backend.lower().startswith(SNI_PLACEHOLDER):
        problems.append(
            ConfigProblem(
                "default_backend",
                _got(
                    cfg.default_backend,
                    'expected a fixed "host:port"; "$sni" forwarding sends clients wherever their SNI '
                    "says, so it must be permitted by an explicit route, e.g. "
                    '{"match": "*.example.org", "backend": "$sni:443"}',
                ),
            )
        )
    if not cfg.routes and cfg.default_backend is None:
        problems.append(
            ConfigProblem(
                "routes",
                'no routes and no default_backend: every connection would be refused; add a route '
                '(e.g. {"match": "a.example.com", "backend": "10.0.0.5:443"}) or set default_backend',
            )
        )
    if len(set(cfg.listen_addr)) != len(cfg.listen_addr):
        problems.append(ConfigProblem("listen_addr", _got(list(cfg.listen_addr), "expected each address once")))
    if cfg.metrics_addr is not None:
        metrics = cfg.metrics
        assert metrics is not None
        for i, listen in enumerate(cfg.listen):
            wildcard = {"0.0.0.0", "::"}
            if metrics.port != 0 and metrics.port == listen.port and (
                metrics.host == listen.host or metrics.host in wildcard or listen.host in wildcard
            ):
                where = "listen_addr" if len(cfg.listen) == 1 else f"listen_addr[{i}]"
                problems.append(
                    ConfigProblem(
                        "metrics_addr",
                        _got(cfg.metrics_addr, f"expected a port not used by {where} ({listen}); pick another port"),
                    )
                )
    if cfg.profiling.enabled and not cfg.profiling.otlp and cfg.profiling.pprof_dir is None:
        problems.append(
            ConfigProblem(
                "profiling",
                "enabled, but profiles would go nowhere: set profiling.otlp to true (export to the "
                'collector of the "otlp" section) and/or profiling.pprof_dir to a directory',
            )
        )
    if cfg.dns.min_ttl_s > cfg.dns.max_ttl_s:
        problems.append(
            ConfigProblem(
                "dns.min_ttl_s",
                _got(cfg.dns.min_ttl_s, f"expected at most dns.max_ttl_s ({cfg.dns.max_ttl_s})"),
            )
        )
    return problems


# --------------------------------------------------------------------------------------------
# Translating pydantic errors into JSON-path problems

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _json_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT_RE.match(str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _strip_annotated(tp: Any) -> tuple[Any, list[Any]]:
    metadata: list[Any] = []
    while typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        tp, metadata = args[0], metadata + list(args[1:])
        # Field(...) inside Annotated carries its constraints in its own metadata.
    flat: list[Any] = []
    for m in metadata:
        flat.extend(getattr(m, "metadata", None) or [m])
    return tp, flat


@dataclass
class _Slot:
    """What the schema expects at one JSON path."""

    tp: Any
    metadata: list[Any]
    nullable: bool = False
    expected: str | None = None  # a field's own wording (json_schema_extra["expected"])


def _slot_at(loc: tuple[Any, ...]) -> _Slot | None:
    slot = _Slot(Config, [])
    for part in loc:
        tp = _strip_annotated(_unwrap_optional(_strip_annotated(slot.tp)[0])[0])[0]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            inner, nullable = _unwrap_optional(field.annotation)
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            slot = _Slot(inner, list(field.metadata), nullable, extra.get("expected"))
            continue
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin in (tuple, list) and isinstance(part, int) and args:
            inner, nullable = _unwrap_optional(args[0])
            slot = _Slot(inner, [], nullable)
        elif origin is dict and args:
            inner, nullable = _unwrap_optional(args[1])
            slot = _Slot(inner, [], nullable)
        else:
            return None
    return slot


def _limits(metadata: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in metadata:
        for key in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(m, key, None)
            if value is not None:
                out[key] = value
    return out


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _describe(slot: _Slot) -> str:
    """Human description of what the schema accepts at a slot: `expected <this>`."""
    if slot.expected is not None:
        return slot.expected
    tp, metadata = _strip_annotated(slot.tp)
    metadata = metadata + slot.metadata
    limits = _limits(metadata)
    if typing.get_origin(tp) is Literal:
        text = "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    elif tp is bool:
        text = "true or false"
    elif tp in (int, float):
        noun = "an integer" if tp is int else "a number"
        low = f">= {_num(limits['ge'])}" if "ge" in limits else (f"> {_num(limits['gt'])}" if "gt" in limits else "")
        high = f"<= {_num(limits['le'])}" if "le" in limits else ""
        if "ge" in limits and "le" in limits:
            text = f"{noun} from {_num(limits['ge'])} to {_num(limits['le'])}"
        else:
            text = " ".join(x for x in (noun, low, "and" if low and high else "", high) if x)
    elif tp is str:
        text = "a string"
    elif isinstance(tp, type) and issubclass(tp, BaseModel):
        text = "an object with keys: " + ", ".join(tp.model_fields)
    elif typing.get_origin(tp) in (tuple, list):
        inner = _describe(_Slot(typing.get_args(tp)[0], []))
        low, high = limits.get("min_length"), limits.get("max_length")
        count = ""
        if low and high:
            count = f" ({low} to {high} items)"
        elif high:
            count = f" (at most {high} items)"
        inner_tp = _strip_annotated(typing.get_args(tp)[0])[0]
        if isinstance(inner_tp, type) and issubclass(inner_tp, BaseModel):
            text = f"a list of objects{count}, each {inner.removeprefix('an ')}"
        else:
            text = f"a list of {inner.removeprefix('a ').removeprefix('an ')}s{count}"
    elif typing.get_origin(tp) is dict:
        text = "an object mapping names to " + _describe(_Slot(typing.get_args(tp)[1], []))
    else:
        text = "a valid value"
    if slot.nullable:
        text += " or null"
    return text


def _problem_from_pydantic(error: dict[str, Any], raw: Any) -> ConfigProblem:
    loc = tuple(part for part in error["loc"] if part != "[key]")   # a bad dict key: its own path
    # A single listen_addr string is validated as a one-item list; report it at its own path.
    if loc[:2] == ("listen_addr", 0) and isinstance(raw, dict) and isinstance(raw.get("listen_addr"), str):
        loc = ("listen_addr",) + loc[2:]
    path = _json_path(loc)
    kind = error["type"]
    value = error.get("input")
    if loc and loc[-1] == "password" and isinstance(value, str):
        value = "<hidden>"  # never echo a secret into logs
    if len(loc) >= 2 and loc[-2] == "headers" and loc[0] == "otlp" and isinstance(value, str):
        value = HIDDEN      # an OTLP header value is usually a token
    if kind == "extra_forbidden":
        parent = _slot_at(loc[:-1])
        tp = _strip_annotated(parent.tp)[0] if parent else None
        tp = _unwrap_optional(tp)[0] if tp is not None else None
        allowed = list(tp.model_fields) if isinstance(tp, type) and issubclass(tp, BaseModel) else []
        message = "unknown key; allowed keys here: " + ", ".join(allowed)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        if close:
            message += f' (did you mean "{close[0]}"?)'
        return ConfigProblem(path, message)
    slot = _slot_at(loc)
    expected = "expected " + _describe(slot) if slot else "expected a valid value"
    if kind == "missing":
        return ConfigProblem(path, f"missing required key; {expected}")
    if kind in ("value_error", "assertion_error"):
        detail = str(error.get("ctx", {}).get("error", error["msg"]))
        return ConfigProblem(path, _got(value, detail))
    if kind in ("too_short", "too_long") and slot is not None:
        return ConfigProblem(path, _got(value, expected))
    return ConfigProblem(path, _got(value, expected))


# --------------------------------------------------------------------------------------------
# Entry points


def parse_config(data: Any, source: str = "config.json") -> Config:
    """Validate already-decoded JSON; ConfigError lists every problem found."""
    if not isinstance(data, dict):
        raise ConfigError(
            [ConfigProblem("", _got(data, "expected a JSON object ({...}) at the top level"))], source
        )
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # pydantic counts only the items that validated, so one bad item of a one-item list also
        # reports "too short"; the item's own error says it all.
        child_locs = [tuple(e["loc"]) for e in errors]
        errors = [
            e
            for e in errors
            if e["type"] not in ("too_short", "too_long")
            or not any(len(c) > len(e["loc"]) and c[: len(e["loc"])] == tuple(e["loc"]) for c in child_locs)
        ]
        problems = [_problem_from_pydantic(e, data) for e in errors]
        raise ConfigError(problems, source) from None
    except _CrossFieldProblems as exc:
        raise ConfigError(exc.problems, source) from None


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_config(path: str | Path) -> Config:
    """Read and validate a config.json; ConfigError (with the file name as source) on any problem."""
    source = str(path)
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(
            [ConfigProblem("", "file not found; pass --config PATH, or start from examples/config.minimal.json")],
            source,
        ) from None
    except IsADirectoryError:
        raise ConfigError([ConfigProblem("", "is a directory; expected the path of a JSON file")], source) from None
    except PermissionError:
        raise ConfigError(
            [ConfigProblem("", "permission denied; make the file readable by the user running sni-proxy")], source
        ) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {exc.strerror or exc}")], source) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [ConfigProblem("", f"the file is larger than {MAX_CONFIG_BYTES // MiB} MiB; is it the right file?")], source
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigProblem("", f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8")], source
        ) from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        hint = ""
        stripped = text.lstrip()
        if "//" in text or "/*" in text:
            hint = " (JSON has no comments; the commented reference is docs/config.example.jsonc)"
        elif not stripped:
            hint = " (the file is empty)"
        elif exc.msg.startswith("Expecting property name") or exc.msg.startswith("Expecting value"):
            hint = " (a trailing comma before '}' or ']' is not allowed in JSON)"
        raise ConfigError(
            [ConfigProblem("", f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}{hint}")], source
        ) from None
    except _DuplicateKey as exc:
        raise ConfigError(
            [ConfigProblem("", f'key "{exc.key}" appears twice in one object; JSON would keep only the last, remove one')],
            source,
        ) from None
    return parse_config(data, source)


# --------------------------------------------------------------------------------------------
# File permissions
# --------------------------------------------------------------------------------------------


def config_file_warnings(path: str | Path) -> list[str]:
    """Warnings about who may change the config file (it decides where traffic goes).

    A world-writable file (or a symlink to one), or one in a world-writable directory without
    the sticky bit (anyone may replace it), lets any local user reroute connections.
    """
    import os
    import stat

    shown = str(path)
    real = os.path.realpath(path)
    name = real if real == os.path.abspath(shown) else f"{real} (through the symlink {shown})"
    warnings = []
    try:
        mode = os.stat(real).st_mode
    except OSError:
        return warnings
    if mode & stat.S_IWOTH:
        warnings.append(
            f"config file {name} is world-writable (mode {stat.S_IMODE(mode):04o}): any local user "
            f"can change where connections go; fix: chmod o-w {real}")
    parent = os.path.dirname(real)
    try:
        dmode = os.stat(parent).st_mode
    except OSError:
        return warnings
    if dmode & stat.S_IWOTH and not dmode & stat.S_ISVTX:
        warnings.append(
            f"config file {name} is in the world-writable directory {parent} (mode "
            f"{stat.S_IMODE(dmode):04o}, no sticky bit): any local user can replace it; fix: "
            f"chmod o-w {parent}, or move the file")
    return warnings
