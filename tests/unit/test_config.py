"""config.json validation: every key's bad value is reported with its JSON path, the bad value
and what is allowed; the shipped examples load; the docs mention every key."""

from __future__ import annotations

import copy
import json
import re
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from sniproxy.config import (
    Config,
    ConfigError,
    HostPort,
    load_config,
    normalize_hostname,
    parse_backend,
    parse_config,
    parse_hostport,
)

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "listen_addr": "0.0.0.0:8443",
    "routes": [
        {"match": "a.example.com", "backend": "10.0.0.5:443"},
        {"match": "*.example.org", "backend": "$sni:443", "upstream": "corp"},
        {"match": "~^api-[0-9]+\\.example\\.net$", "backend": "10.0.0.9:443", "proxy_protocol": "v2"},
    ],
    "upstreams": {"corp": {"type": "socks5", "addr": "127.0.0.1:1080", "username": "u", "password": "p"}},
}


def with_value(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy of the base config with the value at a dotted path (ints index lists) replaced."""
    data = copy.deepcopy(BASE if base is None else base)
    parts: list[Any] = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = data
    for part in parts[:-1]:
        if isinstance(part, str) and part not in node:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return data


def problems_of(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    lines = str(info.value).splitlines()
    assert len(lines) == len(info.value.problems)
    return lines


def test_the_seed_config_is_accepted() -> None:
    seed = {
        "listen_addr": "0.0.0.0:8443",
        "max_connections": 50000,
        "workers": 1,
        "metrics_addr": "127.0.0.1:9090",
        "routes": BASE["routes"],
        "default_backend": None,
        "upstreams": BASE["upstreams"],
        "timeouts": {"client_hello_s": 5, "connect_s": 5, "idle_s": 300},
        "ebpf": {
            "enabled": False,
            "sockmap": {"enabled": True, "max_entries": 65536},
            "dns_cache": {"enabled": True, "max_entries": 10000},
            "stats": {"enabled": True},
        },
        "fallback_mode": "auto",
    }
    cfg = parse_config(seed)
    assert cfg.listen == (HostPort("0.0.0.0", 8443),)
    assert cfg.timeouts.shutdown_grace_s == 30
    assert cfg.ebpf.sockmap.max_inflight_bytes == 64 * 1024 * 1024
    assert cfg.ebpf.sockmap.backpressure is True
    assert cfg.ebpf.dns_cache.pin_path == "/sys/fs/bpf/sni-proxy"
    assert cfg.listen_backlog == 4096
    assert cfg.routes[1].upstream == "corp" and cfg.routes[0].upstream == "direct"
    assert cfg.routes[2].proxy_protocol == "v2"
    assert cfg.ebpf_requested() == {"sockmap": False, "dns_cache": False, "stats": False,
                                    "tcp_splice": False}


# (dotted path, bad value, fragments the message must contain besides the path and the value)
BAD_VALUES: list[tuple[str, Any, list[str]]] = [
    ("listen_addr", "0.0.0.0", ['"host:port"', "port is missing"]),
    ("listen_addr", "::1:8443", ["brackets"]),
    ("listen_addr", "0.0.0.0:70000", ["0 to 65535"]),
    ("listen_addr", [], ["list of 1 to 64"]),
    ("listen_addr", 8443, ['"host:port" string']),
    ("listen_backlog", 0, ["integer from 1 to 65535"]),
    ("listen_defer_accept", "yes", ["true or false"]),
    ("listen_reuse_port_shared", 1, ["true or false"]),
    ("max_connections", "50000", ["integer from 1 to 10000000"]),
    ("max_connections", True, ["integer"]),
    ("max_connections", 1.5, ["integer"]),
    ("workers", 257, ["integer from 1 to 256"]),
    ("metrics_addr", "9090", ['"host:port"', "HTTP listen address"]),
    ("routes", "a.example.com", ["a list of objects", "match, backend"]),
    ("routes.0", "a.example.com", ["an object with keys: match, backend"]),
    ("routes.0.match", 5, ['"*.suffix" or "~regex"']),
    ("routes.0.match", "*", ["first label"]),
    ("routes.0.match", "a.*.example.com", ["first label", "regex"]),
    ("routes.0.match", "*example.com", ["first label"]),
    ("routes.0.match", "~(unclosed", ["invalid regular expression", "position"]),
    ("routes.0.match", "~", ["regex", "empty"]),
    ("routes.0.match", "a..example.com", ["empty label"]),
    ("routes.0.match", "-a.example.com", ["label '-a'"]),
    ("routes.0.match", "a b.example.com", ["letters, digits"]),
    ("routes.0.match", "x" * 64 + ".example.com", ["longer than 63"]),
    ("routes.0.backend", "x", ['expected "host:port" or "$sni:port" (e.g. "10.0.0.5:443")']),
    ("routes.0.backend", "$sni", ['"$sni:443"']),
    ("routes.0.backend", "10.0.0.5:0", ["1 to 65535"]),
    ("routes.0.backend", "2001:db8::5:443", ["brackets"]),
    ("routes.0.backend", "[10.0.0.5]:443", ["not an IPv6 address"]),
    ("routes.0.backend", None, ['"host:port" or "$sni:port"']),
    ("routes.0.upstream", "crop", ['"direct"', "defined: corp"]),
    ("routes.0.proxy_protocol", "v3", ['one of "v1", "v2" or null']),
    ("routes.0.allow_private", "yes", ["true or false"]),
    ("routes.0.name", "", ["1 to 128"]),
    ("routes.0.name", "default_backend", ["reserved"]),
    ("routes.0.name", "*.example.org", ["already the name of routes[1]; route names label metrics"]),
    ("default_backend", "$sni:443", ["explicit route"]),
    ("default_backend", "nope", ['"host:port"']),
    ("upstreams", [], ["an object mapping names"]),
    ("upstreams.direct", {"type": "socks5", "addr": "127.0.0.1:1080"}, ["reserved"]),
    ("upstreams.bad name", {"type": "socks5", "addr": "127.0.0.1:1080"}, ["letters, digits"]),
    ("upstreams.corp.type", "http", ['one of "socks5"']),
    ("upstreams.corp.addr", "localhost", ['the SOCKS5 server as "host:port"', "port is missing"]),
    ("upstreams.corp.username", "", ["1 to 255 bytes"]),
    ("upstreams.corp.username", "ü" * 128, ["256 bytes"]),
    ("upstreams.corp.password", "x" * 256, ["1 to 255 bytes"]),
    ("timeouts", 5, ["an object with keys: client_hello_s"]),
    ("timeouts.client_hello_s", 0, ["a number > 0 and <= 300"]),
    ("timeouts.connect_s", "5", ["a number > 0 and <= 300"]),
    ("timeouts.dns_s", 61, ["<= 60"]),
    ("timeouts.idle_s", -1, ["> 0"]),
    ("timeouts.shutdown_grace_s", 3601, ["from 0 to 3600"]),
    ("dns.nameservers", ["dns.google"], ["IP addresses, not names"]),
    ("dns.nameservers", "1.1.1.1", ["a list of IP addresses"]),
    ("dns.nameservers", [], ["a list of IP addresses"]),
    ("dns.min_ttl_s", -1, ["from 0 to 86400"]),
    ("dns.min_ttl_s", 7200, ["at most dns.max_ttl_s (3600)"]),
    ("dns.max_ttl_s", 0, ["from 1 to 604800"]),
    ("dns.negative_ttl_s", 3601, ["from 0 to 3600"]),
    ("dns.cache_size", 0, ["from 1 to 10000000"]),
    ("relay.mode", "zerocopy", ['one of "auto", "splice", "copy"']),
    ("relay.buffer_bytes", 100, ["from 4096 to 16777216"]),
    ("log.level", "WARN", ['"debug", "info", "warning", "error"']),
    ("log.format", "xml", ['"plain", "json"']),
    ("log.file", "", ["file path"]),
    ("log.access_log", "no", ["true or false"]),
    ("ebpf.enabled", 1, ["true or false"]),
    ("ebpf.sockmap.enabled", "true", ["true or false"]),
    ("ebpf.sockmap.max_entries", 1, ["from 2 to 16777216"]),
    ("ebpf.sockmap.max_inflight_bytes", 1024, ["from 65536 to 1073741824"]),
    ("ebpf.sockmap.backpressure", "on", ["true or false"]),
    ("ebpf.sockmap.sndbuf_bytes", 1, ["from 4096 to 1073741824 or null"]),
    ("ebpf.dns_cache.enabled", None, ["true or false"]),
    ("ebpf.dns_cache.max_entries", 0, ["from 1 to 16777216"]),
    ("ebpf.dns_cache.pin_path", "bpf/sni", ["absolute path"]),
    ("ebpf.stats.enabled", [], ["true or false"]),
    ("ebpf.stats", True, ["an object with keys: enabled"]),
    ("ebpf.tracing.network", "yes", ["true or false"]),
    ("ebpf.tracing", True, ["an object with keys: network"]),
    ("ebpf.tcp_splice.enabled", "yes", ["true or false"]),
    ("ebpf.tcp_splice.interfaces", "lo", ["null"]),
    ("ebpf.tcp_splice.max_flows", 0, ["from 1 to 4194304"]),
    ("ebpf.tcp_splice.linger_s", -1.0, ["from 0 to 600"]),
    ("ebpf.tcp_splice.pin_path", "bpf/ts", ["absolute path"]),
    ("ebpf.tcp_splice.bpf_socket_state", "yes", ["true or false"]),
    ("ebpf.tcp_splice", 1, ["an object with keys: enabled, interfaces, max_flows"]),
    ("ebpf.sockmap", None, ["an object with keys: enabled, max_entries, max_inflight_bytes"]),
    ("ebpf.dns_cache", "on", ["an object with keys: enabled, max_entries, pin_path"]),
    ("ebpf", False, ["an object with keys: enabled, sockmap, dns_cache, stats, tracing, tcp_splice"]),
    ("dns", ["1.1.1.1"], ["an object with keys: nameservers"]),
    ("relay", "splice", ["an object with keys: mode, buffer_bytes"]),
    ("log", "debug", ["an object with keys: level, format, file, access_log"]),
    ("fallback_mode", "off", ['one of "auto", "strict"']),
    ("otlp", True, ["an object with keys: enabled, endpoint, protocol"]),
    ("otlp.enabled", "yes", ["true or false"]),
    ("otlp.endpoint", "collector:4317", ["http:// or https:// URL", "scheme"]),
    ("otlp.endpoint", "http://:4317", ["host is missing"]),
    ("otlp.protocol", "http/json", ['one of "grpc", "http/protobuf"']),
    ("otlp.headers", ["a"], ["an object mapping names"]),
    ("otlp.interval_s", 0, ["from 0.1 to 86400"]),
    ("otlp.timeout_s", 0, ["> 0 and <= 300"]),
    ("otlp.temporality", "DELTA", ['one of "cumulative", "delta", "lowmemory"']),
    ("otlp.resource", {"a": 1}, ["a string"]),
    ("profiling", [], ["an object with keys: enabled, environment"]),
    ("profiling.enabled", 1, ["true or false"]),
    ("profiling.environment", "staging", ['one of "production", "development", "debug"']),
    ("profiling.export_interval_s", 0.5, ["from 1 to 86400"]),
    ("profiling.max_samples", 0, ["from 1 to 1000000, or null"]),
    ("profiling.targets", [-1], ['"self"', "list of process ids"]),
    ("profiling.otlp", "no", ["true or false"]),
    ("profiling.pprof_dir", "profiles", ["absolute"]),
    ("profiling.retention", 0, ["from 1 to 10000"]),
    ("profiling.export_queue", 0, ["from 1 to 1000"]),
    ("profiling.export_attempts", 101, ["from 1 to 100"]),
]


def _json_path(dotted: str) -> str:
    out = ""
    for part in dotted.split("."):
        if part.isdigit():
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out


@pytest.mark.parametrize("path, value, fragments", BAD_VALUES, ids=[f"{p}={v!r}"[:60] for p, v, _ in BAD_VALUES])
def test_bad_value_names_path_value_and_what_is_allowed(path: str, value: Any, fragments: list[str]) -> None:
    lines = problems_of(with_value(path, value))
    json_path = _json_path(path)
    mine = [line for line in lines if line.startswith(f"config.json: {json_path}")]
    assert mine, f"no problem reported at {json_path}: {lines}"
    line = mine[0]
    if not json_path.startswith("upstreams") or "." in path.removeprefix("upstreams."):
        shown = "'<hidden>'" if path.endswith("password") else None
        if shown is None and not isinstance(value, (dict, list)) or value == []:
            shown = repr(value) if isinstance(value, str) else json.dumps(value)
        if shown is not None:
            assert f"got {shown[:60]}" in line, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def _leaf_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every key of the schema (routes as routes.0, upstreams as upstreams.corp)."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        tp = field.annotation
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            paths += _leaf_paths(tp, path + ".")
        elif typing.get_origin(tp) is tuple and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            paths += _leaf_paths(args[0], path + ".0.")
        elif typing.get_origin(tp) is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
            paths += _leaf_paths(args[1], path + ".corp.")
    return paths


def test_every_key_has_a_bad_value_case() -> None:
    covered = {path for path, _, _ in BAD_VALUES}
    missing = [p for p in _leaf_paths(Config) if p not in covered]
    assert not missing, f"keys without a bad-value test: {missing}"


def test_otlp_header_values_are_never_echoed() -> None:
    secret = "Bearer s3cret\n"
    text = str(pytest.raises(ConfigError, parse_config, with_value("otlp.headers", {"authorization": secret})).value)
    assert "s3cret" not in text and "<hidden>" in text and "otlp.headers.authorization" in text
    cfg = parse_config(with_value("otlp.headers", {"Authorization": "Bearer s3cret"}))
    assert cfg.otlp.headers == {"authorization": "Bearer s3cret"}     # gRPC wants lower-case keys
    assert "s3cret" not in json.dumps(cfg.summary())


def test_profiling_needs_somewhere_to_send_profiles() -> None:
    lines = problems_of(with_value("profiling", {"enabled": True, "otlp": False}))
    assert any("profiles would go nowhere" in line for line in lines), lines


def test_password_is_never_echoed() -> None:
    secret = "s3cret-" + "x" * 300
    text = str(pytest.raises(ConfigError, parse_config, with_value("upstreams.corp.password", secret)).value)
    assert "s3cret" not in text and "<hidden>" in text


@pytest.mark.parametrize(
    "path, model",
    [
        ("", Config),
        ("routes.0", None),
        ("upstreams.corp", None),
        ("timeouts", None),
        ("dns", None),
        ("relay", None),
        ("log", None),
        ("ebpf", None),
        ("ebpf.sockmap", None),
        ("ebpf.dns_cache", None),
        ("ebpf.stats", None),
        ("otlp", None),
        ("profiling", None),
    ],
)
def test_unknown_key_anywhere_lists_the_allowed_keys(path: str, model: Any) -> None:
    data = copy.deepcopy(BASE)
    node: Any = data
    for part in [p for p in path.split(".") if p]:
        part_key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict) and part_key not in node:
            node[part_key] = {}
        node = node[part_key]
    node["bogus_key"] = 1
    lines = problems_of(data)
    json_path = _json_path(f"{path}.bogus_key" if path else "bogus_key")
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"config.json: {json_path}: unknown key; allowed keys here: "), lines[0]


def test_unknown_key_message_format_and_suggestion() -> None:
    lines = problems_of(with_value("ebpf.sockmp", {"enabled": True}))
    assert lines == [
        "config.json: ebpf.sockmp: unknown key; allowed keys here: enabled, sockmap, dns_cache, stats,"
        " tracing, tcp_splice"
        ' (did you mean "sockmap"?)'
    ]


def test_all_problems_are_reported_at_once() -> None:
    data = with_value("workers", 0)
    data = with_value("routes.2.backend", "x", data)
    data = with_value("log.level", "loud", data)
    lines = problems_of(data)
    assert [line.split(":")[1].strip() for line in lines] == ["workers", "routes[2].backend", "log.level"]
    assert lines[1] == (
        "config.json: routes[2].backend: got 'x': expected \"host:port\" or \"$sni:port\" "
        '(e.g. "10.0.0.5:443"); the port is missing'
    )


def test_missing_required_keys() -> None:
    lines = problems_of(with_value("routes.0", {"match": "a.example.com"}))
    assert lines == [
        'config.json: routes[0].backend: missing required key; expected "host:port" or "$sni:port" (e.g. "10.0.0.5:443")'
    ]
    lines = problems_of(with_value("upstreams.corp", {"addr": "127.0.0.1:1080"}))
    assert lines[0].startswith("config.json: upstreams.corp.type: missing required key")


def test_socks5_credentials_go_in_pairs() -> None:
    lines = problems_of(with_value("upstreams.corp", {"type": "socks5", "addr": "127.0.0.1:1080", "username": "u"}))
    assert lines == ["config.json: upstreams.corp.password: missing: SOCKS5 username and password go together (give both or neither)"]


def test_top_level_must_be_an_object() -> None:
    assert problems_of([1]) == ["config.json: got [1]: expected a JSON object ({...}) at the top level"]


def test_no_routes_and_no_default_is_refused() -> None:
    (line,) = problems_of({"listen_addr": "0.0.0.0:8443"})
    assert line.startswith("config.json: routes: no routes and no default_backend")
    assert parse_config({"default_backend": "10.0.0.5:443"}).routes == ()


def test_duplicate_matches_after_normalisation() -> None:
    data = with_value("routes.1", {"match": "A.Example.COM.", "backend": "10.0.0.6:443"})
    (line,) = problems_of(data)
    assert line == (
        "config.json: routes[1].match: got 'a.example.com': the same match as routes[0].match, "
        "so this route could never be chosen; remove one of them"
    )
    data = with_value("routes.1", {"match": "xn--bcher-kva.example", "backend": "10.0.0.6:443"})
    data = with_value("routes.0", {"match": "Bücher.example", "backend": "10.0.0.6:443"}, data)
    assert "the same match as routes[0].match" in problems_of(data)[0]


def test_metrics_port_must_differ_from_listen_port() -> None:
    (line,) = problems_of(with_value("metrics_addr", "0.0.0.0:8443"))
    assert line.startswith("config.json: metrics_addr: got '0.0.0.0:8443': expected a port not used by listen_addr")
    assert parse_config(with_value("metrics_addr", None)).metrics is None


def test_listen_addresses_ipv6_and_lists() -> None:
    cfg = parse_config(with_value("listen_addr", ["0.0.0.0:8443", "[::]:8443", "[::1]:9000", "127.0.0.1:0"]))
    assert cfg.listen == (
        HostPort("0.0.0.0", 8443),
        HostPort("::", 8443),
        HostPort("::1", 9000),
        HostPort("127.0.0.1", 0),
    )
    assert [str(a) for a in cfg.listen] == ["0.0.0.0:8443", "[::]:8443", "[::1]:9000", "127.0.0.1:0"]
    (line,) = problems_of(with_value("listen_addr", ["0.0.0.0:8443", "0.0.0.0:8443"]))
    assert line.startswith("config.json: listen_addr: got") and "each address once" in line
    (line,) = problems_of(with_value("listen_addr", ["0.0.0.0:8443", "nope"]))
    assert line.startswith("config.json: listen_addr[1]: got 'nope'")


def test_routes_are_normalised() -> None:
    cfg = parse_config(
        with_value(
            "routes",
            [
                {"match": "Bücher.Example.", "backend": "Backend.Internal:443"},
                {"match": "*.MÜNCHEN.de", "backend": "[2001:DB8::0005]:443"},
                {"match": "~^API\\.", "backend": "$SNI:8443"},
            ],
            {**BASE, "upstreams": {}},
        )
    )
    assert [r.match for r in cfg.routes] == ["xn--bcher-kva.example", "*.xn--mnchen-3ya.de", "~^API\\."]
    assert [r.backend for r in cfg.routes] == ["backend.internal:443", "[2001:db8::5]:443", "$sni:8443"]
    assert [r.kind for r in cfg.routes] == ["exact", "wildcard", "regex"]
    assert cfg.routes[2].target.dynamic and cfg.routes[2].target.port == 8443
    assert cfg.routes[0].route_name == "xn--bcher-kva.example"


def test_config_is_frozen() -> None:
    cfg = parse_config(BASE)
    with pytest.raises(Exception):
        cfg.workers = 2  # type: ignore[misc]
    with pytest.raises(Exception):
        cfg.routes[0].backend = "1.2.3.4:5"  # type: ignore[misc]


def test_summary_is_safe_for_status() -> None:
    summary = parse_config(BASE).summary()
    text = json.dumps(summary)
    assert '"p"' not in text and "password" not in text and "username" not in text
    assert summary["upstreams"] == {"corp": {"type": "socks5", "addr": "127.0.0.1:1080", "auth": True}}
    assert summary["routes"][0]["name"] == "a.example.com"
    assert summary["listen_addr"] == ["0.0.0.0:8443"]


def test_ebpf_requested_needs_the_master_switch() -> None:
    cfg = parse_config(with_value("ebpf", {"enabled": True, "dns_cache": {"enabled": False}}))
    assert cfg.ebpf_requested() == {"sockmap": True, "dns_cache": False, "stats": True,
                                    "tcp_splice": True}


# ---- parse_hostport / parse_backend / normalize_hostname


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1.2.3.4:443", HostPort("1.2.3.4", 443)),
        ("[::1]:443", HostPort("::1", 443)),
        ("[2001:DB8:0::1]:65535", HostPort("2001:db8::1", 65535)),
        ("Name.Example:1", HostPort("name.example", 1)),
        ("bücher.example:443", HostPort("xn--bcher-kva.example", 443)),
        ("localhost:80", HostPort("localhost", 80)),
    ],
)
def test_parse_hostport_accepts(text: str, expected: HostPort) -> None:
    assert parse_hostport(text, what="an address") == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("1.2.3.4", "port is missing"),
        ("1.2.3.4:", "1 to 65535"),
        ("1.2.3.4:0", "1 to 65535"),
        ("1.2.3.4:65536", "1 to 65535"),
        ("1.2.3.4:+80", "1 to 65535"),
        ("1.2.3.4:٤٤٣", "1 to 65535"),  # Arabic-Indic digits pass str.isdigit
        ("::1", "brackets"),
        ("::1:443", "brackets"),
        ("[::1]", "port is missing"),
        ("[::1:443", "never closed"),
        ("[1.2.3.4]:443", "not an IPv6 address"),
        (":443", "host is empty"),
        ("bad_host!:443", "not an IP address or a valid host name"),
    ],
)
def test_parse_hostport_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text, what="the SOCKS5 server")
    assert str(info.value).startswith('expected the SOCKS5 server as "host:port"')
    assert why in str(info.value)


def test_parse_hostport_port_zero_only_when_allowed() -> None:
    assert parse_hostport("127.0.0.1:0", what="x", allow_port_zero=True).port == 0
    with pytest.raises(ValueError):
        parse_hostport("127.0.0.1:0", what="x")


def test_parse_backend() -> None:
    assert parse_backend("$sni:443").dynamic
    assert str(parse_backend("$SNI:443")) == "$sni:443"
    assert parse_backend("[::1]:8443").host == "::1"
    with pytest.raises(ValueError, match=r'"\$sni" must be followed by ":port"'):
        parse_backend("$sni")
    with pytest.raises(ValueError, match="1 to 65535"):
        parse_backend("$sni:0")


def test_normalize_hostname() -> None:
    assert normalize_hostname("WWW.Example.COM.") == "www.example.com"
    assert normalize_hostname("bücher.example") == "xn--bcher-kva.example"
    assert normalize_hostname("BÜCHER。example") == "xn--bcher-kva.example"  # ideographic full stop
    assert normalize_hostname("_dmarc.example") == "_dmarc.example"
    for bad in ["", ".", "a..b", "a-.b", "a.-b", "a b", "x" * 64, ("a" * 63 + ".") * 4 + "a"]:
        with pytest.raises(ValueError):
            normalize_hostname(bad)


# ---- files


def test_example_files_load() -> None:
    full = load_config(ROOT / "examples" / "config.json")
    assert full.ebpf.enabled and len(full.routes) >= 5
    assert {r.kind for r in full.routes} == {"exact", "wildcard", "regex"}
    minimal = load_config(ROOT / "examples" / "config.minimal.json")
    assert len(minimal.routes) == 1


def _strip_jsonc(text: str) -> str:
    """Remove // comments outside strings (enough for our own commented example)."""
    out, in_string, i = [], False, 0
    while i < len(text):
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\":
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def test_commented_example_is_valid_once_comments_are_removed() -> None:
    text = (ROOT / "docs" / "config.example.jsonc").read_text(encoding="utf-8")
    cfg = parse_config(json.loads(_strip_jsonc(text)))
    # It documents every key: its JSON holds every leaf of the schema.
    data = json.loads(_strip_jsonc(text))

    def present(node: Any, parts: list[str]) -> bool:
        if not parts:
            return True
        head, rest = parts[0], parts[1:]
        if head == "0":  # a list: some item has the key
            return any(present(item, rest) for item in node)
        return isinstance(node, dict) and head in node and present(node[head], rest)

    missing = [path for path in _leaf_paths(Config) if not present(data, path.split("."))]
    assert not missing, f"docs/config.example.jsonc lacks {missing}"
    assert cfg.routes[3].match == "xn--bcher-kva.example"


def test_reference_page_documents_every_key() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for path in _leaf_paths(Config):
        last = path.split(".")[-1]
        nested = path.replace(".0.", ".").replace(".corp.", ".")
        assert f"`{nested}" in doc or f"`{last}`" in doc, f"docs/configuration.md does not mention {path}"


def test_load_config_errors(tmp_path: Path) -> None:
    def error_of(path: Path) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(path)
        return str(info.value)

    missing = tmp_path / "nope.json"
    assert error_of(missing) == f"{missing}: file not found; pass --config PATH, or start from examples/config.minimal.json"
    assert "is a directory" in error_of(tmp_path)

    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "listen_addr": "0.0.0.0:8443",\n  "workers": 1,\n}\n')
    message = error_of(bad)
    assert message.startswith(f"{bad}: line 4, column 1: invalid JSON: ")
    assert "trailing comma" in message

    bad.write_text('{\n  // a comment\n  "workers": 1\n}\n')
    assert "JSON has no comments" in error_of(bad)

    bad.write_text("")
    assert "the file is empty" in error_of(bad)

    bad.write_text('{"workers": 1, "workers": 2}')
    assert 'key "workers" appears twice' in error_of(bad)

    bad.write_bytes(b'{"workers": "\xff"}')
    assert "not UTF-8" in error_of(bad)

    bad.write_text(json.dumps(with_value("workers", 0)))
    assert error_of(bad) == (f"{bad}: workers: got 0: expected an integer from 1 to 256, or \"auto\" "
                             "(enough workers for max_connections under the fd limit)")

    good = tmp_path / "bom.json"
    good.write_bytes(b"\xef\xbb\xbf" + json.dumps(BASE).encode())
    assert load_config(str(good)).routes[0].match == "a.example.com"
