"""The sans-IO ClientHello reader: real hellos, synthetic ones of every size, every split,
every reject reason, and hypothesis for the inputs nobody thought of; each test against both
parsers (the `parser` fixture)."""

from __future__ import annotations

import os
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sniproxy.proxy.clienthello import (
    HANDSHAKE_FAILURE,
    INTERNAL_ERROR,
    MAX_CLIENT_HELLO,
    MAX_HELLO_RECORDS,
    PROTOCOL_VERSION,
    REJECT_REASONS,
    UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloReader,
    NeedMore,
    Rejected,
    parse_client_hello,
    tls_alert,
)

try:
    from hello_builder import (
        EXT_ALPN,
        EXT_SERVER_NAME,
        EXT_SUPPORTED_VERSIONS,
        X25519,
        X25519MLKEM768,
        X25519MLKEM768_SHARE,
        alpn_ext,
        build_hello,
        client_hello_body,
        extension,
        handshake,
        real_hello,
        record,
        records,
        server_name_ext,
        u16,
        vec16,
    )
except ImportError:  # tests/ became a package
    from tests.unit.hello_builder import (  # type: ignore[no-redef]
        EXT_ALPN,
        EXT_SERVER_NAME,
        EXT_SUPPORTED_VERSIONS,
        X25519,
        X25519MLKEM768,
        X25519MLKEM768_SHARE,
        alpn_ext,
        build_hello,
        client_hello_body,
        extension,
        handshake,
        real_hello,
        record,
        records,
        server_name_ext,
        u16,
        vec16,
    )

OUTCOMES = (ClientHello, NeedMore, Rejected)


@pytest.fixture(autouse=True, scope="module", params=["compiled", "python"])
def parser(request: pytest.FixtureRequest):
    """Every test here runs against both parsers: the compiled common case with the Python
    parser behind it (the default), and the Python parser alone (SNI_PROXY_CLIENTHELLO=python).
    Module scope: hypothesis refuses function-scoped fixtures around @given tests."""
    from sniproxy.proxy import clienthello
    chosen, why = clienthello.select_parser(request.param)
    try:
        if chosen != request.param:
            pytest.fail(f"the {request.param} ClientHello parser does not run: {why}")
        yield chosen
    finally:
        clienthello.select_parser()           # back to what the environment selects


def pq_hello(**kwargs: object) -> bytes:
    """A Chrome-like post-quantum hello: X25519MLKEM768 + X25519 shares, ~1.4 KB handshake."""
    kwargs.setdefault("alpn", ("h2", "http/1.1"))
    return build_hello(key_shares=((X25519MLKEM768, X25519MLKEM768_SHARE), (X25519, 32)), **kwargs)


def big_hello() -> bytes:
    """A ~2 KB post-quantum hello padded further, split over several records."""
    return records(pq_hello(padding=600), sizes=[512, 3, 700])


def assert_sound(outcome: object) -> None:
    """Every outcome is one of the three types and a rejection carries a known reason."""
    assert isinstance(outcome, OUTCOMES), outcome
    if isinstance(outcome, Rejected):
        assert outcome.reason in REJECT_REASONS
        assert not outcome.detail.startswith("internal parser error"), outcome.detail


def record_count(message: bytes, sizes: list[int]) -> int:
    """How many records `records(message, sizes)` makes."""
    count = pos = 0
    while pos < len(message):
        pos += sizes[min(count, len(sizes) - 1)]
        count += 1
    return count


def same_hello(a: object, b: object) -> bool:
    """Equal apart from how the bytes were framed into records."""
    assert isinstance(a, ClientHello) and isinstance(b, ClientHello), (a, b)
    return (a.sni, a.alpn, a.versions, a.legacy_version, a.extension_types) == (
        b.sni, b.alpn, b.versions, b.legacy_version, b.extension_types
    )


# ---------------------------------------------------------------------------------------------
# Real hellos from OpenSSL
# ---------------------------------------------------------------------------------------------


def test_real_hello_with_sni() -> None:
    data = real_hello("Example.COM")
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.sni == "example.com"
    assert 0x0304 in hello.versions and 0x0303 in hello.versions
    assert hello.legacy_version == 0x0303
    assert hello.consumed == len(data)
    assert hello.records == 1
    assert hello.alpn == ()


def test_real_hello_with_alpn() -> None:
    hello = parse_client_hello(real_hello("api.example.net", alpn=["h2", "http/1.1"]))
    assert isinstance(hello, ClientHello)
    assert hello.sni == "api.example.net"
    assert hello.alpn == ("h2", "http/1.1")


def test_real_tls12_only_hello_has_no_supported_versions() -> None:
    hello = parse_client_hello(real_hello("example.com", max_version=ssl.TLSVersion.TLSv1_2))
    assert isinstance(hello, ClientHello)
    assert EXT_SUPPORTED_VERSIONS not in hello.extension_types
    assert hello.versions == (0x0303,)


@pytest.mark.parametrize("hostname", [None, "127.0.0.1", "::1"])
def test_real_hello_without_sni_is_valid(hostname: str | None) -> None:
    hello = parse_client_hello(real_hello(hostname))
    assert isinstance(hello, ClientHello)
    assert hello.sni is None
    assert EXT_SERVER_NAME not in hello.extension_types


def test_bytes_after_the_hello_are_not_consumed() -> None:
    data = real_hello()
    early = record(b"\x17" * 40, content_type=23, version=0x0303)
    hello = parse_client_hello(data + early)
    assert isinstance(hello, ClientHello) and hello.consumed == len(data)


def test_accepts_bytearray_and_memoryview() -> None:
    data = real_hello()
    expected = parse_client_hello(data)
    assert parse_client_hello(bytearray(data)) == expected
    assert parse_client_hello(memoryview(data)) == expected


# ---------------------------------------------------------------------------------------------
# Synthetic hellos: size, fragmentation, field semantics
# ---------------------------------------------------------------------------------------------


def test_post_quantum_hello_over_several_records() -> None:
    data = big_hello()
    assert len(data) > 2000
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.sni == "example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.consumed == len(data)
    assert hello.records == 5  # 512, 3, 700, 700, rest


def test_handshake_header_split_across_records() -> None:
    message = build_hello()
    for first in (1, 2, 3, 4, 5):
        hello = parse_client_hello(records(message, sizes=[first, 1000]))
        assert isinstance(hello, ClientHello) and hello.sni == "example.com", first


def test_hello_of_exactly_the_limit_is_accepted() -> None:
    message = build_hello(padding=0)
    pad = MAX_CLIENT_HELLO - (len(message) - 4)
    message = build_hello(padding=pad)
    assert len(message) - 4 == MAX_CLIENT_HELLO
    hello = parse_client_hello(records(message))  # needs two records: 2^14 + 4 bytes
    assert isinstance(hello, ClientHello) and hello.records == 2


def test_trailing_bytes_in_the_last_record_are_consumed_with_it() -> None:
    message = build_hello()
    data = record(message + b"\x00" * 7)
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello) and hello.consumed == len(data)


def test_hello_without_extensions_block() -> None:
    data = records(handshake(client_hello_body(extensions=None, legacy_version=0x0301)))
    hello = parse_client_hello(data)
    assert hello == ClientHello(None, (), (0x0301,), 0x0301, len(data), 1, ())


def test_sni_is_normalised() -> None:
    for raw, expected in [
        ("WWW.Example.ORG.", "www.example.org"),
        ("_acme.internal", "_acme.internal"),
        ("xn--fa-hia.de", "xn--fa-hia.de"),
        ("a" * 63 + "." + "b" * 63, "a" * 63 + "." + "b" * 63),
        ("1.2.3.4", "1.2.3.4"),  # RFC 6066 forbids IP literals; routing decides what to do
    ]:
        hello = parse_client_hello(records(build_hello(sni=raw)))
        assert isinstance(hello, ClientHello) and hello.sni == expected, raw


def test_253_byte_sni_is_accepted() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    assert len(name) == 253
    hello = parse_client_hello(records(build_hello(sni=name)))
    assert isinstance(hello, ClientHello) and hello.sni == name


def test_unknown_server_name_types_are_skipped() -> None:
    entries = b"\x07" + vec16(b"opaque") + b"\x00" + vec16(b"h.example")
    ext = extension(EXT_SERVER_NAME, vec16(entries))
    hello = parse_client_hello(records(build_hello(sni=None, extra=[ext])))
    assert isinstance(hello, ClientHello) and hello.sni == "h.example"
    only_other = server_name_ext("x", name_type=7)
    hello = parse_client_hello(records(build_hello(sni=None, extra=[only_other])))
    assert isinstance(hello, ClientHello) and hello.sni is None


def test_grease_versions_are_dropped() -> None:
    hello = parse_client_hello(records(build_hello(versions=[0x7A7A, 0x0304, 0x0303])))
    assert isinstance(hello, ClientHello) and hello.versions == (0x0304, 0x0303)


def test_non_ascii_alpn_is_kept_visible() -> None:
    hello = parse_client_hello(records(build_hello(alpn=[b"h\xff"])))
    assert isinstance(hello, ClientHello) and hello.alpn == ("h\\xff",)


# ---------------------------------------------------------------------------------------------
# Every byte boundary
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["real", "pq_2k_fragmented"])
def test_every_prefix_needs_more_then_the_same_hello(name: str) -> None:
    data = real_hello() if name == "real" else big_hello()
    full = parse_client_hello(data)
    assert isinstance(full, ClientHello)
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) == NeedMore(cut), cut
        reader = ClientHelloReader()
        assert reader.feed(data[:cut]) == NeedMore(cut)
        assert reader.feed(data[cut:]) == full, cut


@pytest.mark.parametrize("name", ["real", "pq_2k_fragmented"])
def test_one_byte_at_a_time(name: str) -> None:
    data = real_hello() if name == "real" else big_hello()
    reader = ClientHelloReader()
    outcomes = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(isinstance(o, NeedMore) for o in outcomes[:-1])
    assert outcomes[-1] == parse_client_hello(data)
    assert reader.buffered == data


def test_reader_outcome_is_sticky() -> None:
    data = real_hello()
    reader = ClientHelloReader()
    hello = reader.feed(data)
    assert isinstance(hello, ClientHello)
    assert reader.feed(b"more application bytes") is hello
    assert reader.buffered == data + b"more application bytes"
    rejecting = ClientHelloReader()
    rejected = rejecting.feed(b"GET")
    assert isinstance(rejected, Rejected)
    assert rejecting.feed(real_hello()) is rejected
    assert ClientHelloReader().feed(b"") == NeedMore(0)


# ---------------------------------------------------------------------------------------------
# Each reject reason
# ---------------------------------------------------------------------------------------------

GOOD = build_hello()
GOOD_300 = build_hello(padding=300)  # needs more than MAX_HELLO_RECORDS one-byte records


def body_with(**kwargs: object) -> bytes:
    return records(handshake(client_hello_body(**kwargs)))  # type: ignore[arg-type]


REJECT_CASES: list[tuple[str, bytes, str]] = [
    ("http_get", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", "not_tls"),
    ("http_first_byte", b"P", "not_tls"),
    ("proxy_v1", b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n", "not_tls"),
    ("zero_byte", b"\x00\x00\x00\x00\x00", "not_tls"),
    ("high_bit_not_sslv2", b"\x80\x10\x05", "not_tls"),
    ("ssh_banner", b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls"),
    ("sslv2", b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", "sslv2"),
    ("record_version_2_0", b"\x16\x02\x00\x00\x10", "bad_version"),
    ("record_version_3_5", b"\x16\x03\x05", "bad_version"),
    ("legacy_version_4_0", body_with(legacy_version=0x0400), "bad_version"),
    ("zero_length_record", record(b""), "bad_length"),
    ("zero_length_second_record", records(GOOD, sizes=[10])[:15] + record(b""), "bad_length"),
    ("record_over_2_14", b"\x16\x03\x01\x40\x01", "bad_length"),
    ("handshake_too_short", record(handshake(b"\x03\x03" + bytes(10))), "bad_length"),
    ("cipher_suites_overrun", record(handshake(u16(0x0303) + bytes(32) + b"\x00\xff\xf0" + bytes(8))), "bad_length"),
    ("extensions_length_mismatch", record(handshake(client_hello_body([]) + b"\x00")), "bad_length"),
    ("too_large_17k", b"\x16\x03\x01\x00\x09\x01" + (17 * 1024).to_bytes(3, "big"), "too_large"),
    ("too_fragmented", records(GOOD_300, sizes=[1]), "too_fragmented"),
    ("server_hello", record(handshake(client_hello_body(), msg_type=2)), "not_client_hello"),
    ("finished_first", b"\x16\x03\x03\x00\x24\x14", "not_client_hello"),
    ("alert_first", tls_alert(HANDSHAKE_FAILURE), "unexpected_record"),
    ("app_data_first", record(b"x", content_type=23, version=0x0303), "unexpected_record"),
    ("ccs_interleaved", records(GOOD, sizes=[40])[:45] + record(b"\x01", content_type=20), "unexpected_record"),
    ("duplicate_extension", body_with(extensions=[alpn_ext(["h2"]), alpn_ext(["h2"])]), "malformed"),
    ("extension_overrun", body_with(extensions=[u16(EXT_ALPN) + u16(50) + b"\x00"]), "malformed"),
    ("extension_header_cut", body_with(extensions=[b"\x00\x10\x00"]), "malformed"),
    ("session_id_33", body_with(session_id=bytes(33)), "malformed"),
    ("odd_cipher_suites", records(handshake(u16(0x0303) + bytes(32) + b"\x00" + b"\x00\x03\x13\x01\x13" + b"\x01\x00")), "malformed"),
    ("no_compression", body_with(compression=b""), "malformed"),
    ("alpn_empty_name", body_with(extensions=[extension(EXT_ALPN, vec16(b"\x00"))]), "malformed"),
    ("alpn_list_mismatch", body_with(extensions=[extension(EXT_ALPN, u16(9) + b"\x02h2")]), "malformed"),
    ("versions_odd", body_with(extensions=[extension(EXT_SUPPORTED_VERSIONS, b"\x03\x03\x04\x03")]), "malformed"),
    ("versions_empty", body_with(extensions=[extension(EXT_SUPPORTED_VERSIONS, b"")]), "malformed"),
    ("server_name_empty_ext", body_with(extensions=[extension(EXT_SERVER_NAME, b"")]), "malformed"),
    ("server_name_empty_list", body_with(extensions=[extension(EXT_SERVER_NAME, u16(0))]), "malformed"),
    ("two_host_names", body_with(extensions=[server_name_ext("a.example", "b.example")]), "malformed"),
    ("host_name_overrun", body_with(extensions=[extension(EXT_SERVER_NAME, vec16(b"\x00\x00\x20ab"))]), "malformed"),
    ("sni_empty", records(build_hello(sni=b"")), "bad_sni"),
    ("sni_space", records(build_hello(sni=b"exa mple.com")), "bad_sni"),
    ("sni_nul", records(build_hello(sni=b"example.com\x00.evil")), "bad_sni"),
    ("sni_slash", records(build_hello(sni=b"example.com/x")), "bad_sni"),
    ("sni_empty_label", records(build_hello(sni=b"a..example")), "bad_sni"),
    ("sni_only_dot", records(build_hello(sni=b".")), "bad_sni"),
    ("sni_label_64", records(build_hello(sni=b"a" * 64 + b".com")), "bad_sni"),
    ("sni_254", records(build_hello(sni=".".join(["a" * 63] * 3 + ["b" * 62]))), "bad_sni"),
    ("sni_utf8", records(build_hello(sni="bücher.example".encode())), "bad_sni"),
    ("sni_latin1", records(build_hello(sni=b"b\xfccher.example")), "bad_sni"),
]


@pytest.mark.parametrize("data,reason", [c[1:] for c in REJECT_CASES], ids=[c[0] for c in REJECT_CASES])
def test_reject_reason(data: bytes, reason: str) -> None:
    outcome = parse_client_hello(data)
    assert isinstance(outcome, Rejected), outcome
    assert outcome.reason == reason, outcome.detail
    assert_sound(outcome)
    # Decided on the bytes seen, never undone by more bytes of any kind (the detail may say
    # more once more bytes are visible, e.g. "P" vs "PROXY ...").
    later = parse_client_hello(data + GOOD)
    assert isinstance(later, Rejected) and later.reason == reason
    # And no prefix decides differently.
    for cut in range(len(data)):
        early = parse_client_hello(data[:cut])
        assert isinstance(early, NeedMore) or early.reason == reason, (cut, early)


def test_every_reject_reason_has_a_case() -> None:
    assert {reason for _, _, reason in REJECT_CASES} == set(REJECT_REASONS)


def test_too_large_is_decided_from_the_header_alone() -> None:
    message = handshake(bytes(17 * 1024))
    data = records(message)
    assert parse_client_hello(data[:8]) == NeedMore(8)
    outcome = parse_client_hello(data[:9])
    assert isinstance(outcome, Rejected) and outcome.reason == "too_large"
    assert "17408" in outcome.detail
    # Also when the header straddles two records.
    split = records(message, sizes=[2, 16384])
    assert parse_client_hello(split[:13]) == NeedMore(13)
    assert parse_client_hello(split[:14]).reason == "too_large"  # type: ignore[union-attr]


def test_limit_is_configurable() -> None:
    data = records(pq_hello())
    assert isinstance(parse_client_hello(data), ClientHello)
    outcome = parse_client_hello(data, limit=1024)
    assert isinstance(outcome, Rejected) and outcome.reason == "too_large"


def test_http_detail_tells_the_user_what_happened() -> None:
    outcome = parse_client_hello(b"GET / HTTP/1.1\r\n")
    assert isinstance(outcome, Rejected)
    assert "plain HTTP" in outcome.detail and "https://" in outcome.detail
    junk = parse_client_hello(b"\x00\x01")
    assert isinstance(junk, Rejected) and "HTTP" not in junk.detail


def test_non_ascii_sni_detail_suggests_the_a_label() -> None:
    outcome = parse_client_hello(records(build_hello(sni="bücher.example".encode())))
    assert isinstance(outcome, Rejected)
    assert "xn--bcher-kva.example" in outcome.detail


def test_fragmentation_limit_counts_records_not_bytes() -> None:
    message = GOOD_300
    sizes = [1] * (MAX_HELLO_RECORDS - 1) + [10_000]
    hello = parse_client_hello(records(message, sizes=sizes))
    assert isinstance(hello, ClientHello) and hello.records == MAX_HELLO_RECORDS


# ---------------------------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------------------------


def test_tls_alert_bytes() -> None:
    assert tls_alert(UNRECOGNIZED_NAME) == b"\x15\x03\x03\x00\x02\x02\x70"
    assert tls_alert(HANDSHAKE_FAILURE, 0x0301) == b"\x15\x03\x01\x00\x02\x02\x28"
    assert tls_alert(PROTOCOL_VERSION) == b"\x15\x03\x03\x00\x02\x02\x46"
    assert tls_alert(INTERNAL_ERROR) == b"\x15\x03\x03\x00\x02\x02\x50"
    with pytest.raises(ValueError):
        tls_alert(256)
    with pytest.raises(ValueError):
        tls_alert(40, 0x10000)


# ---------------------------------------------------------------------------------------------
# Hypothesis
# ---------------------------------------------------------------------------------------------

# HELLO_EXAMPLES=5000 for a longer soak; 200 keeps the file at about two seconds.
FAST = settings(
    max_examples=int(os.environ.get("HELLO_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = [real_hello(), real_hello(None, alpn=["h2"]), records(pq_hello(), sizes=[300, 200])]


@FAST
@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert_sound(parse_client_hello(data))


@FAST
@given(st.binary(min_size=41, max_size=400))
def test_random_body_behind_valid_headers_never_raises(body: bytes) -> None:
    # Random bytes rarely start with 0x16 0x03; this drives them into the body parser.
    assert_sound(parse_client_hello(record(handshake(body))))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif len(data) > 1:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


@FAST
@given(mutated(), st.data())
def test_mutated_hellos_never_raise_and_prefixes_agree(data: bytes, draw: st.DataObject) -> None:
    full = parse_client_hello(data)
    assert_sound(full)
    cut = draw.draw(st.integers(0, len(data)))
    early = parse_client_hello(data[:cut])
    assert_sound(early)
    if isinstance(early, Rejected):
        assert isinstance(full, Rejected) and early.reason == full.reason
    elif isinstance(early, ClientHello):
        assert early == full


@FAST
@given(st.sampled_from(SEEDS), st.lists(st.integers(1, 2000), min_size=1, max_size=6))
def test_arbitrary_tcp_splits_give_the_same_result(data: bytes, cuts: list[int]) -> None:
    reader = ClientHelloReader()
    points = sorted({min(c, len(data)) for c in cuts} | {len(data)})
    start = 0
    outcome: object = None
    for point in points:
        outcome = reader.feed(data[start:point])
        start = point
        if point < len(data):
            assert outcome == NeedMore(point)
    assert outcome == parse_client_hello(data)


@FAST
@given(st.lists(st.integers(1, 700), min_size=1, max_size=12))
def test_arbitrary_record_fragmentation_gives_the_same_hello(sizes: list[int]) -> None:
    message = pq_hello(padding=300)
    reference = parse_client_hello(records(message))
    data = records(message, sizes=sizes)
    hello = parse_client_hello(data)
    if record_count(message, sizes) > MAX_HELLO_RECORDS:
        assert isinstance(hello, Rejected) and hello.reason == "too_fragmented"
        return
    assert isinstance(hello, ClientHello) and same_hello(hello, reference)
    assert hello.consumed == len(data)


LABEL = st.from_regex(r"[a-z0-9_-]{1,63}", fullmatch=True)
HOSTNAME = st.lists(LABEL, min_size=1, max_size=6).map(".".join).filter(lambda n: len(n) <= 253)
ALPN_ID = st.binary(min_size=1, max_size=255).filter(lambda b: b.isascii())


@FAST
@given(
    HOSTNAME,
    st.booleans(),
    st.lists(ALPN_ID, max_size=5),
    st.lists(st.sampled_from([0x0304, 0x0303, 0x0302]), min_size=1, max_size=3, unique=True),
)
def test_built_hellos_round_trip(
    host: str, upper: bool, alpn: list[bytes], versions: list[int]
) -> None:
    sni = host.upper() if upper else host
    hello = parse_client_hello(records(build_hello(sni=sni, alpn=alpn, versions=versions)))
    assert isinstance(hello, ClientHello)
    assert hello.sni == host
    assert hello.alpn == tuple(a.decode("ascii") for a in alpn)
    assert hello.versions == tuple(versions)


@FAST
@given(st.text(min_size=1, max_size=40))
def test_arbitrary_unicode_sni_never_raises(name: str) -> None:
    outcome = parse_client_hello(records(build_hello(sni=name.encode("utf-8", "surrogatepass"))))
    assert_sound(outcome)
    if isinstance(outcome, ClientHello):
        assert outcome.sni is not None and outcome.sni.isascii()
        assert outcome.sni == outcome.sni.lower()


def test_need_more_says_where_the_outcome_can_change_next():
    """The IO layer waits for the end of the record being received (SO_RCVLOWAT) instead of
    re-parsing on every segment; parsing at any length before it gives the same NeedMore."""
    data = client_hello_bytes_for_lowat()
    record_end = 5 + int.from_bytes(data[3:5], "big")
    first = parse_client_hello(data[:3])
    assert first.decides_at == 5                      # the record header
    mid = parse_client_hello(data[:40])
    assert mid.decides_at == record_end
    for cut in range(40, record_end):
        assert parse_client_hello(data[:cut]) == NeedMore(cut)
    assert not isinstance(parse_client_hello(data[:record_end]), NeedMore)


def test_rejected_refuses_an_unknown_reason():
    with pytest.raises(ValueError, match="not one of"):
        Rejected("made_up", "x")


def client_hello_bytes_for_lowat() -> bytes:
    from tests.unit.hello_builder import build_hello, records
    return records(build_hello("lowat.test"))


@pytest.mark.parametrize("name", ["real", "pq_2k_fragmented"])
def test_a_hello_fed_one_byte_at_a_time_is_parsed_a_few_times_per_record(name: str) -> None:
    """Linear, as h11's receive buffer: the reader re-parses only at the length NeedMore named
    (record type, version, length, the handshake header, the record's end), never per byte.
    Before, every feed re-walked the whole buffer: len(data) parses, len(data)**2 / 2 bytes."""
    data = real_hello() if name == "real" else big_hello()
    full = parse_client_hello(data)
    reader = ClientHelloReader()
    walked = 0
    for i in range(len(data)):
        before = reader.parses
        outcome = reader.feed(data[i : i + 1])
        if reader.parses != before:
            walked += i + 1
        if i < len(data) - 1:
            assert outcome == NeedMore(i + 1), i
    assert outcome == full
    per_record = 5            # type, version, length, handshake header, end of the record
    assert reader.parses <= per_record * full.records + 1, reader.parses
    assert walked <= (per_record * full.records + 1) * len(data)
    assert reader.parses < len(data) // 20


def test_a_bad_handshake_header_is_rejected_before_its_record_completes() -> None:
    """Waiting for decides_at never delays a rejection the bytes already prove."""
    data = records(build_hello(sni="early.test"))
    too_large = bytearray(data[:9])
    too_large[6:9] = (MAX_CLIENT_HELLO + 1).to_bytes(3, "big")
    reader = ClientHelloReader()
    outcomes = [reader.feed(too_large[i : i + 1]) for i in range(len(too_large))]
    assert isinstance(outcomes[-1], Rejected) and outcomes[-1].reason == "too_large"
    assert all(isinstance(o, NeedMore) for o in outcomes[:-1])
    not_hello = bytearray(data[:6])
    not_hello[5] = 2                  # server_hello
    reader = ClientHelloReader()
    outcomes = [reader.feed(not_hello[i : i + 1]) for i in range(len(not_hello))]
    assert outcomes[-1] == parse_client_hello(bytes(not_hello))
    assert isinstance(outcomes[-1], Rejected) and outcomes[-1].reason == "not_client_hello"


@FAST
@given(st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40))
def test_any_cut_gives_the_outcome_of_parsing_the_prefix(cuts: list[int]) -> None:
    """decides_at is safe: skipping parses before it never changes what the reader answers."""
    data = big_hello()
    reader = ClientHelloReader()
    pos = 0
    for size in cuts:
        if pos >= len(data):
            break
        chunk = data[pos : pos + size]
        pos += len(chunk)
        assert reader.feed(chunk) == parse_client_hello(data[:pos])
