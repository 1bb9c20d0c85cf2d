"""The compiled ClientHello fast path (sniproxy.proxy._clienthello) against its reference, the
Python parser: for any bytes, it answers exactly when Python returns a ClientHello from one
record, and then with the same ClientHello; otherwise None (Python decides). Generated hellos,
mutations of real and generated ones, hellos captured from curl / openssl s_client / Python's
ssl, and the switch (SNI_PROXY_CLIENTHELLO, the extension missing) in real subprocesses.
"""
from __future__ import annotations

import array
import ctypes
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sniproxy.proxy import clienthello as ch
from sniproxy.proxy.clienthello import MAX_CLIENT_HELLO, ClientHello, NeedMore, Rejected

from tests.unit.hello_builder import (
    EXT_ALPN,
    EXT_SERVER_NAME,
    EXT_SUPPORTED_VERSIONS,
    alpn_ext,
    build_hello,
    client_hello_body,
    extension,
    handshake,
    real_hello,
    record,
    records,
    server_name_ext,
    supported_versions_ext,
    u8,
    u16,
    vec8,
    vec16,
)
from tests.hidden_module import sitecustomize_hiding

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

# CLIENTHELLO_EXAMPLES=20000 for a longer soak; 200 keeps the file at about ten seconds.
EXAMPLES = int(os.environ.get("CLIENTHELLO_EXAMPLES", "200"))
FAST = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FAST, max_examples=max(EXAMPLES // 4, 10))


@pytest.fixture(scope="module", autouse=True)
def compiled():
    if ch._clienthello is None:
        pytest.fail(f"sniproxy.proxy._clienthello is not built ({ch._COMPILED_MISSING}): install "
                    "gcc and python3-dev, then `pip install -e .`")
    chosen, why = ch.select_parser("compiled")     # configures it even under =python
    assert chosen == "compiled", why
    yield
    ch.select_parser()


def fast(buf, limit: int = MAX_CLIENT_HELLO):
    return ch._clienthello.parse(buf, limit)


def python_parse(buf, limit: int = MAX_CLIENT_HELLO):
    """The reference: the Python parser alone (parse_client_hello's body without _fast)."""
    try:
        return ch._parse(buf, limit)
    except ch._Reject as rej:
        return Rejected(rej.reason, rej.detail)


def check(buf, limit: int = MAX_CLIENT_HELLO):
    """The property: the fast path answers exactly for the hellos Python finds in one record,
    with the same ClientHello (every field), and never raises. Returns Python's outcome."""
    reference = python_parse(buf, limit)
    expected = reference if isinstance(reference, ClientHello) and reference.records == 1 else None
    got = fast(buf, limit)
    assert got == expected, (got, reference)
    if got is not None:
        assert type(got) is ClientHello
        # == compares the fields as a tuple; the types matter too (True == 1, 1.0 == 1)
        for name in ("sni", "alpn", "versions", "legacy_version", "consumed", "records",
                     "extension_types"):
            a, b = getattr(got, name), getattr(expected, name)
            assert type(a) is type(b) and a == b, (name, a, b)
        assert all(type(x) is str for x in got.alpn)
        assert all(type(x) is int for x in got.versions + got.extension_types)
        assert hash(got) == hash(expected)
        # parse_client_hello (the dispatch) returns it
        assert ch.parse_client_hello(buf, limit) == expected
    return reference


# ---------------------------------------------------------------------------------------------
# Generated well-formed hellos: the fast path answers, with Python's fields
# ---------------------------------------------------------------------------------------------

LABEL = st.from_regex(rb"[A-Za-z0-9_-]{1,63}", fullmatch=True)
HOST = (st.lists(LABEL, min_size=1, max_size=8).map(b".".join)
        .filter(lambda n: len(n) <= 253)
        .flatmap(lambda n: st.sampled_from([n, n + b"."] if len(n) < 253 else [n, n + b"."])))
GREASE = st.integers(0, 15).map(lambda i: (i << 12) | 0x0A00 | (i << 4) | 0x0A)
VERSION = st.one_of(st.sampled_from([0x0304, 0x0303, 0x0302, 0x0301, 0x0300, 0x7F1C]), GREASE,
                    st.integers(0, 0xFFFF))
OTHER_TYPE = st.one_of(GREASE, st.integers(0, 0xFFFF)).filter(
    lambda t: t not in (EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS))


@st.composite
def server_name_data(draw: st.DrawFn) -> bytes:
    """A valid server_name body: one host_name, maybe among entries of other name types."""
    entries = [u8(0) + vec16(draw(HOST))]
    for _ in range(draw(st.integers(0, 2))):
        entries.insert(draw(st.integers(0, len(entries))),
                       u8(draw(st.integers(1, 255))) + vec16(draw(st.binary(max_size=20))))
    if draw(st.integers(0, 9)) == 0:                 # other types only: no SNI
        entries = [e for e in entries if e[0] != 0] or [u8(7) + vec16(b"x")]
    return vec16(b"".join(entries))


@st.composite
def valid_hello(draw: st.DrawFn) -> bytes:
    """One record holding a well-formed hello, of any shape the format allows."""
    exts: list[bytes] = []
    if draw(st.booleans()):
        exts.append(extension(EXT_SERVER_NAME, draw(server_name_data())))
    if draw(st.booleans()):
        names = draw(st.lists(st.binary(min_size=1, max_size=24), min_size=1, max_size=6))
        exts.append(alpn_ext(names))                 # any bytes: non-ASCII too
    if draw(st.booleans()):
        exts.append(supported_versions_ext(draw(st.lists(VERSION, min_size=1, max_size=10))))
    for etype in draw(st.lists(OTHER_TYPE, max_size=12, unique=True)):
        exts.append(extension(etype, draw(st.binary(max_size=40))))
    exts = draw(st.permutations(exts))
    shape = draw(st.sampled_from(["extensions", "extensions", "extensions", "none", "empty"]))
    body = client_hello_body(
        extensions=None if shape == "none" else [] if shape == "empty" else exts,
        legacy_version=draw(st.integers(0x0300, 0x0304)),
        session_id=draw(st.binary(max_size=32)),
        cipher_suites=draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=40)),
        compression=draw(st.binary(min_size=1, max_size=4)))
    inside = draw(st.binary(max_size=8))             # after the hello, inside its record
    after = draw(st.binary(max_size=16))             # the client's next bytes
    return record(handshake(body) + inside, version=draw(st.integers(0x0300, 0x0304))) + after


@FAST
@given(valid_hello())
def test_the_fast_path_answers_every_well_formed_hello_as_python(data: bytes) -> None:
    reference = check(data)
    assert isinstance(reference, ClientHello) and reference.records == 1, reference
    assert fast(data) is not None


@FEW
@given(valid_hello())
def test_any_bytes_like_input(data: bytes) -> None:
    expected = python_parse(data)
    for kind in (bytes, bytearray, memoryview):
        assert fast(kind(data)) == expected, kind
    assert fast(memoryview(b"\x00" + data)[1:]) == expected


# ---------------------------------------------------------------------------------------------
# Mutations: whatever the bytes, None or Python's hello
# ---------------------------------------------------------------------------------------------

SEEDS = [
    real_hello("Example.COM"),
    real_hello("api.example.net", alpn=["h2", "http/1.1"]),
    real_hello(None),
    records(build_hello(sni="a" * 63 + ".example.", alpn=[b"h2", b"\xff\x00"],
                        versions=[0x3A3A, 0x0304, 0x0303], padding=40)),
    records(handshake(client_hello_body(extensions=None, legacy_version=0x0301))),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.one_of(st.sampled_from(SEEDS), valid_hello())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set16", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "set16" and len(data) >= 2:
            # a length field (record 3, handshake 7, or anywhere) set to a nearby or any value
            at = draw(st.sampled_from([3, 7, pos])) if len(data) > 9 else 0
            at = min(at, len(data) - 2)
            old = (data[at] << 8) | data[at + 1]
            new = draw(st.one_of(st.integers(max(old - 4, 0), min(old + 4, 0xFFFF)),
                                 st.integers(0, 0xFFFF)))
            data[at:at + 2] = u16(new)
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and len(data) > pos + 4:
            # a copy of some 4..40 bytes (an extension, with luck) right after them
            size = draw(st.integers(4, 40))
            data[pos + size:pos + size] = data[pos:pos + size]
    return bytes(data)


@FAST
@given(mutated(), st.sampled_from([MAX_CLIENT_HELLO, MAX_CLIENT_HELLO, 300, 41, 40, 0, -1]))
def test_mutated_hellos_give_none_or_pythons_hello(data: bytes, limit: int) -> None:
    check(data, limit)


@FAST
@given(st.binary(max_size=600))
@example(b"")
@example(b"\x16\x03\x01\x00\x04\x01\x00\x00\x00")
def test_random_bytes(data: bytes) -> None:
    check(data)


@FAST
@given(st.binary(min_size=41, max_size=400), st.binary(max_size=4))
def test_random_bodies_behind_valid_headers(body: bytes, inside: bytes) -> None:
    check(record(handshake(body) + inside))


def _rebuild(exts: list[bytes], **kwargs) -> bytes:
    return records(handshake(client_hello_body(exts, **kwargs)))


@FAST
@given(st.lists(st.tuples(st.sampled_from([EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS,
                                           21, 51, 0xFAFA, 0xFFFF]),
                          st.binary(max_size=30)), max_size=8))
def test_garbage_inside_well_framed_extensions(exts: list[tuple[int, bytes]]) -> None:
    """The outer framing right, the bodies of the three extensions read arbitrary (and
    extensions possibly duplicated): the inner parsers' checks, one by one."""
    check(_rebuild([extension(t, d) for t, d in exts]))


def test_every_truncation_of_real_hellos() -> None:
    for data in SEEDS:
        for cut in range(len(data) + 1):
            outcome = check(data[:cut])
            if cut < len(data):
                assert isinstance(outcome, NeedMore), (cut, outcome)
        assert fast(data) is not None


def test_every_byte_flip_of_a_real_hello() -> None:
    data = bytearray(SEEDS[1])
    for pos in range(len(data)):
        for bit in (0x01, 0x80):
            data[pos] ^= bit
            check(bytes(data))
            data[pos] ^= bit


def _host(name: bytes, **kwargs) -> bytes:
    return records(build_hello(sni=name, **kwargs))


NAME_253 = b".".join([b"a" * 63] * 3 + [b"b" * 61])
NAME_254 = b".".join([b"a" * 63] * 3 + [b"b" * 62])
NAMES = {
    "trailing_dot": b"Example.COM.",
    "two_trailing_dots": b"example.com..",
    "only_dot": b".",
    "leading_dot": b".example.com",
    "empty_label": b"a..b",
    "label_63": b"a" * 63 + b".com",
    "label_64": b"a" * 64 + b".com",
    "name_253": NAME_253,
    "name_253_dot": NAME_253 + b".",
    "name_254": NAME_254,
    "name_254_dot": NAME_254 + b".",
    "underscore_hyphen": b"_acme-challenge.-x-.example",
    "utf8": "bücher.example".encode(),
    "latin1": b"b\xfccher.example",
    "nul": b"example.com\x00.evil",
    "space": b"exa mple.com",
    "slash": b"example.com/x",
    "empty": b"",
    "ip": b"1.2.3.4",
}


@pytest.mark.parametrize("name", NAMES.values(), ids=NAMES.keys())
def test_host_name_rules_are_pythons(name: bytes) -> None:
    outcome = check(_host(name))
    accepted = name in (b"Example.COM.", b"a" * 63 + b".com", NAME_253, NAME_253 + b".",
                        b"_acme-challenge.-x-.example", b"1.2.3.4")
    assert isinstance(outcome, ClientHello) == accepted, outcome
    if not accepted:
        assert fast(_host(name)) is None


@FAST
@given(st.binary(max_size=300))
def test_any_host_name_bytes(name: bytes) -> None:
    check(_host(name))


def test_structural_edge_cases_are_pythons() -> None:
    cases = [
        _rebuild([alpn_ext(["h2"]), alpn_ext(["h2"])]),                       # duplicate
        _rebuild([extension(21, b""), extension(21, b"")]),                   # duplicate
        _rebuild([server_name_ext("a.example", "b.example")]),                # two host names
        _rebuild([supported_versions_ext([0x0A0A, 0x1A1A])]),                 # only GREASE: ()
        _rebuild([extension(EXT_SUPPORTED_VERSIONS, vec8(b"\x03"))]),        # odd
        _rebuild([extension(EXT_ALPN, vec16(b"\x00"))]),                      # empty name
        _rebuild([extension(EXT_ALPN, vec16(vec8(bytes(range(1, 256)))))]),  # 255 odd bytes
        _rebuild([], session_id=bytes(33)),
        _rebuild([], compression=b""),
        _rebuild([], cipher_suites=()),
        _rebuild([], legacy_version=0x0305),
        records(handshake(client_hello_body([]) + b"\x00")),                   # extensions cut
        records(build_hello(), sizes=[100]),                                   # two records
        records(build_hello(padding=16384 - 200)),                             # two records
        record(handshake(client_hello_body([extension(21, bytes(16384 - 100))]))[:16389]),
    ]
    for data in cases:
        check(data)
    assert fast(cases[3]).versions == ()
    assert fast(cases[6]).alpn == (bytes(range(1, 256)).decode("ascii", "backslashreplace"),)


def test_many_extensions_fill_a_record() -> None:
    """~4,000 empty extensions of distinct types: the duplicate check stays linear and its
    state does not leak into the next parse."""
    many = [extension(t, b"") for t in range(100, 100 + (16384 - 200) // 4)]
    data = _rebuild(many)
    hello = check(data)
    assert isinstance(hello, ClientHello) and len(hello.extension_types) == len(many)
    assert fast(_rebuild(many[:5] + many[:1])) is None          # a duplicate after them
    assert fast(data) == hello                                  # nothing left set


class GuardedBuffer:
    """Bytes placed at the very end of a readable page, the next page PROT_NONE: a read one
    byte past the buffer the fast path is given kills the process (SIGSEGV) instead of
    reading what happens to follow, as in a bytes object (its trailing NUL, the heap)."""

    def __init__(self) -> None:
        self.page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 2 * self.page)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        if libc.mprotect(base + self.page, self.page, 0) != 0:   # PROT_NONE
            raise OSError(ctypes.get_errno(), "mprotect")
        self.view = memoryview(self.map)

    def at_end(self, data: bytes) -> memoryview:
        assert len(data) <= self.page
        start = self.page - len(data)
        self.map[start:self.page] = data
        return self.view[start:self.page]


def test_no_read_past_the_end_of_the_buffer() -> None:
    guard = GuardedBuffer()
    cases = [s for s in SEEDS]
    cases += [_host(name) for name in NAMES.values()]
    cases.append(_rebuild([extension(t, b"") for t in range(100, 700)]))
    for data in cases:
        for cut in range(len(data) + 1):
            check(guard.at_end(data[:cut]))
    # and the record claiming more than is there, at every length field
    data = bytearray(SEEDS[1])
    for pos in range(len(data) - 1):
        saved = data[pos:pos + 2]
        data[pos:pos + 2] = b"\xff\xff"
        check(guard.at_end(bytes(data)))
        data[pos:pos + 2] = saved


def test_non_bytes_never_raise() -> None:
    data = SEEDS[0]
    assert fast(memoryview(array.array("H", data[:len(data) // 2 * 2]))) is None
    assert fast(memoryview(data).cast("B", (1, len(data)))) is None     # 2-D
    for junk in ("text", 42, None, object(), [22, 3, 1]):
        assert fast(junk) is None
    assert fast(data, 2**80) is None                                    # a limit no C size holds


def test_configure_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="7 field names"):
        ch._clienthello.configure(ClientHello, ("sni",))
    with pytest.raises(TypeError):
        ch._clienthello.configure("ClientHello", ())


# ---------------------------------------------------------------------------------------------
# Hellos captured from real clients
# ---------------------------------------------------------------------------------------------

def _capture(argv: list[str], port_at: int) -> bytes:
    """The first flight a client command sends to a loopback listener (then reset)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(10)
    port = lsock.getsockname()[1]
    argv = [a.replace("PORT", str(port)) for a in argv]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while not isinstance(python_parse(data), ClientHello):
                chunk = conn.recv(65536)
                assert chunk, f"{argv[0]} closed before its ClientHello: {data!r}"
                data += chunk
                assert len(data) < 65536
        return data
    finally:
        lsock.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CLIENTS = {
    "curl": ["curl", "-sk", "--max-time", "5", "--resolve", "Curl.Example:PORT:127.0.0.1",
             "https://Curl.Example:PORT/"],
    "curl_tls12_h1": ["curl", "-sk", "--max-time", "5", "--tlsv1.2", "--tls-max", "1.2",
                      "--http1.1", "--resolve", "h1.example:PORT:127.0.0.1",
                      "https://h1.example:PORT/"],
    "openssl_s_client": ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername",
                         "s-client.example", "-alpn", "h2,http/1.1"],
    "openssl_s_client_no_sni": ["openssl", "s_client", "-connect", "127.0.0.1:PORT",
                                "-noservername", "-tls1_2"],
}


@pytest.mark.parametrize("client", CLIENTS, ids=CLIENTS.keys())
def test_hellos_of_real_clients_parse_identically(client: str) -> None:
    data = _capture(CLIENTS[client], 0)
    hello = check(data)
    assert fast(data) is not None and fast(data) == hello
    expected_sni = {"curl": "curl.example", "curl_tls12_h1": "h1.example",
                    "openssl_s_client": "s-client.example", "openssl_s_client_no_sni": None}
    assert hello.sni == expected_sni[client]


def test_python_ssl_hellos_parse_identically() -> None:
    import ssl
    for kwargs in ({"server_hostname": "py.example"}, {"server_hostname": None},
                   {"alpn": ["h2", "http/1.1", "spdy/3.1"]},
                   {"max_version": ssl.TLSVersion.TLSv1_2}):
        data = real_hello(**kwargs)
        assert fast(data) is not None
        check(data)


# ---------------------------------------------------------------------------------------------
# Which parser runs: the environment, a missing extension (real subprocesses)
# ---------------------------------------------------------------------------------------------

PROBE = """\
import json
from sniproxy.proxy import clienthello as ch
from tests.unit.hello_builder import real_hello
hello = ch.parse_client_hello(real_hello("Probe.Example"))
print(json.dumps({"parser": ch.PARSER, "detail": ch.PARSER_DETAIL, "sni": hello.sni,
                  "fast": ch._fast is not None}))
"""

HIDE_EXTENSION = sitecustomize_hiding('sniproxy.proxy._clienthello')


def _probe(env_value: str | None, pythonpath: str = "") -> tuple[dict, str]:
    env = dict(os.environ)
    env.pop(ch.PARSER_ENV, None)
    if env_value is not None:
        env[ch.PARSER_ENV] = env_value
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)
    proc = subprocess.run([PYTHON, "-c", PROBE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_the_compiled_parser_is_the_default() -> None:
    got, err = _probe(None)
    assert got == {"parser": "compiled", "detail": "", "sni": "probe.example", "fast": True}
    assert err == ""


def test_the_environment_selects_the_python_parser() -> None:
    got, _ = _probe("Python")
    assert got == {"parser": "python", "detail": "SNI_PROXY_CLIENTHELLO=python in the environment",
                   "sni": "probe.example", "fast": False}
    got, err = _probe("compiled")
    assert got["parser"] == "compiled" and err == ""


def test_an_unknown_value_is_named_in_one_warning_and_the_default_runs() -> None:
    got, err = _probe("pyhton")
    assert got["parser"] == "compiled" and got["sni"] == "probe.example"
    lines = err.strip().splitlines()
    assert lines == ["SNI_PROXY_CLIENTHELLO='pyhton' is not a ClientHello parser: use python or "
                     "compiled (or leave it unset); the default runs"], err


def test_without_the_extension_the_python_parser_runs_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(HIDE_EXTENSION)
    got, err = _probe(None, pythonpath=str(tmp_path))
    assert got["parser"] == "python" and not got["fast"], got
    assert got["sni"] == "probe.example"
    assert "sniproxy.proxy._clienthello is not built (hidden by the test)" in got["detail"]
    assert "install gcc and python3-dev" in got["detail"]
    # `sni-proxy check` says the same (text and JSON)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(tmp_path), str(ROOT))))
    env.pop(ch.PARSER_ENV, None)
    check_json = subprocess.run([PYTHON, "-m", "sniproxy.cli", "check", "--json"], env=env,
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert json.loads(check_json.stdout)["clienthello_parser"] == {
        "parser": "python", "detail": got["detail"]}
    env.pop("PYTHONPATH")
    text = subprocess.run([PYTHON, "-m", "sniproxy.cli", "check"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60).stdout
    assert "ClientHello parser: compiled (sniproxy.proxy._clienthello" in text, text


def test_a_hello_parsed_in_a_thread_is_the_same() -> None:
    """The duplicate-extension bits are module state guarded by the GIL: parses in several
    threads at once agree with the reference."""
    data = [SEEDS[1], _rebuild([alpn_ext(["h2"]), alpn_ext(["h2"])]), SEEDS[3]]
    expected = [python_parse(d) for d in data]
    expected = [e if isinstance(e, ClientHello) else None for e in expected]
    errors: list[object] = []

    def run() -> None:
        for _ in range(2000):
            for d, e in zip(data, expected):
                if fast(d) != e:
                    errors.append((d, fast(d)))
                    return

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
