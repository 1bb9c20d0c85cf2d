"""The sans-IO SOCKS5 client, driven with byte strings split every way."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sniproxy.proxy.socks5 import (
    REPLY_ERRORS,
    Connected,
    SendData,
    Socks5Client,
    Socks5Error,
    State,
    encode_address,
)

METHOD_NOAUTH = b"\x05\x00"
METHOD_USERPASS = b"\x05\x02"
AUTH_OK = b"\x01\x00"
REPLY_V4 = b"\x05\x00\x00\x01" + bytes([10, 0, 0, 1]) + (4321).to_bytes(2, "big")
REPLY_V6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + (80).to_bytes(2, "big")
REPLY_NAME = b"\x05\x00\x00\x03\x09proxy.lan" + (1080).to_bytes(2, "big")
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


def feed_all(client: Socks5Client, chunks: list[bytes]) -> list:
    """Feed chunks until the tunnel is up; what follows belongs to the relay."""
    events = []
    for chunk in chunks:
        if client.state is State.CONNECTED:
            break
        events += client.receive_data(chunk)
    return events


def splits(data: bytes):
    """Every way of cutting `data` into two non-empty pieces, plus one byte at a time.
    (An empty read is EOF, so it never stands for "nothing yet".)"""
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


# -- requests ----------------------------------------------------------------------------------

def test_greeting_offers_no_auth_only_without_credentials():
    assert Socks5Client("example.com", 443).initial_bytes() == b"\x05\x01\x00"


def test_greeting_offers_userpass_with_credentials():
    assert Socks5Client("example.com", 443, "u", "p").initial_bytes() == b"\x05\x02\x00\x02"


def test_connect_by_domain_name_lets_the_server_resolve():
    assert encode_address("example.com", 443) == b"\x03\x0bexample.com\x01\xbb"


def test_connect_by_ipv4_literal():
    assert encode_address("192.0.2.7", 8443) == b"\x01\xc0\x00\x02\x07\x20\xfb"


def test_connect_by_ipv6_literal_with_or_without_brackets():
    expected = b"\x04" + bytes(15) + b"\x01" + b"\x00\x50"
    assert encode_address("::1", 80) == expected
    assert encode_address("[::1]", 80) == expected


def test_trailing_dot_is_dropped_from_names():
    assert encode_address("example.com.", 443) == b"\x03\x0bexample.com\x01\xbb"


@pytest.mark.parametrize("host", ["a" * 256, "", "bücher.de"])
def test_unencodable_destination_is_rejected_upfront(host):
    with pytest.raises(ValueError):
        Socks5Client(host, 443)


def test_overlong_credentials_are_rejected_upfront():
    with pytest.raises(ValueError, match="username"):
        Socks5Client("example.com", 443, "u" * 256, "p")


# -- the happy paths, split every way ----------------------------------------------------------

@pytest.mark.parametrize("chunks", list(splits(METHOD_NOAUTH + REPLY_V4)))
def test_no_auth_flow_split_anywhere(chunks):
    client = Socks5Client("example.com", 443)
    client.initial_bytes()
    events = feed_all(client, chunks)
    assert events == [SendData(CONNECT_EXAMPLE), Connected(("10.0.0.1", 4321), b"")]
    assert client.state is State.CONNECTED


@pytest.mark.parametrize("chunks", list(splits(METHOD_USERPASS + AUTH_OK + REPLY_NAME)))
def test_userpass_flow_split_anywhere(chunks):
    client = Socks5Client("example.com", 443, "user", "secret")
    events = feed_all(client, chunks)
    assert events == [
        SendData(b"\x01\x04user\x06secret"),
        SendData(CONNECT_EXAMPLE),
        Connected(("proxy.lan", 1080), b""),
    ]


@pytest.mark.parametrize("reply", [REPLY_V4, REPLY_V6, REPLY_NAME])
def test_each_reply_address_type_byte_by_byte(reply):
    client = Socks5Client("example.com", 443)
    client.receive_data(METHOD_NOAUTH)
    events = feed_all(client, [reply[i : i + 1] for i in range(len(reply))])
    assert len(events) == 1 and isinstance(events[0], Connected)
    assert events[0].bound_addr[1] in (4321, 80, 1080)


@pytest.mark.parametrize("chunks", list(splits(REPLY_V6 + b"\x16\x03\x01early")))
def test_early_backend_bytes_after_the_reply_are_leftover(chunks):
    client = Socks5Client("example.com", 443)
    client.receive_data(METHOD_NOAUTH)
    consumed = 0
    events = []
    for chunk in chunks:
        if client.state is State.CONNECTED:
            break
        consumed += len(chunk)
        events += client.receive_data(chunk)
    assert len(events) == 1 and isinstance(events[0], Connected)
    # The bytes after the reply in the read that completed it are payload for the client.
    stream = b"".join(chunks)
    assert events[0].leftover == stream[len(REPLY_V6) : consumed]


def test_leftover_when_everything_arrives_in_one_read():
    client = Socks5Client("example.com", 443)
    events = client.receive_data(METHOD_NOAUTH + REPLY_V4 + b"hello")
    assert events[-1] == Connected(("10.0.0.1", 4321), b"hello")


def test_bytes_after_connected_are_not_ours():
    client = Socks5Client("example.com", 443)
    client.receive_data(METHOD_NOAUTH + REPLY_V4)
    with pytest.raises(RuntimeError, match="relay"):
        client.receive_data(b"more")


@given(st.lists(st.integers(min_value=0, max_value=40), max_size=12), st.binary(max_size=64))
def test_any_fragmentation_gives_the_same_events(cuts, early):
    stream = METHOD_USERPASS + AUTH_OK + REPLY_V6 + early
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    client = Socks5Client("example.com", 443, "u", "p")
    events = []
    for chunk in chunks:
        if client.state is State.CONNECTED:
            break
        events += client.receive_data(chunk)
    connected = events[-1]
    assert isinstance(connected, Connected)
    # Leftover is exactly what followed the reply in the read that completed it.
    consumed = 0
    for chunk in chunks:
        consumed += len(chunk)
        if consumed >= len(stream) - len(early):
            break
    assert connected.leftover == stream[len(stream) - len(early) : consumed]


# -- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rep", sorted(REPLY_ERRORS))
def test_every_reply_code_has_a_human_error(rep):
    client = Socks5Client("example.com", 443, upstream="corp")
    client.receive_data(METHOD_NOAUTH)
    with pytest.raises(Socks5Error) as err:
        client.receive_data(bytes([5, rep]))  # fails on the REP byte, before the address
    slug, text = REPLY_ERRORS[rep]
    assert err.value.code == slug and err.value.rep == rep
    assert text in str(err.value) and "example.com:443" in str(err.value) and "'corp'" in str(err.value)
    assert client.state is State.FAILED


def test_reply_code_messages():
    expected = {
        1: "general SOCKS server failure",
        2: "not allowed by the SOCKS server's ruleset",
        3: "network unreachable",
        4: "host unreachable",
        5: "connection refused",
        6: "TTL expired",
        7: "command not supported",
        8: "address type not supported",
    }
    for rep, words in expected.items():
        assert words in REPLY_ERRORS[rep][1]


def test_unknown_reply_code():
    client = Socks5Client("example.com", 443)
    client.receive_data(METHOD_NOAUTH)
    with pytest.raises(Socks5Error, match="0x42") as err:
        client.receive_data(b"\x05\x42\x00\x01")
    assert err.value.code == "unknown_reply"


def test_auth_rejected_names_the_user():
    client = Socks5Client("example.com", 443, "u", "wrong", upstream="corp")
    client.receive_data(METHOD_USERPASS)
    with pytest.raises(Socks5Error) as err:
        client.receive_data(b"\x01\x01")
    assert err.value.code == "auth_rejected"
    assert "SOCKS5 server rejected username/password for user 'u'" in str(err.value)


@pytest.mark.parametrize("method", [b"\x05\x02", b"\x05\xff"])
def test_server_wants_auth_but_none_configured(method):
    client = Socks5Client("example.com", 443, upstream="corp")
    with pytest.raises(Socks5Error) as err:
        client.receive_data(method)
    assert err.value.code == "no_acceptable_method"
    assert ("server requires authentication but no username/password configured for upstream "
            "'corp'") in str(err.value)


def test_no_acceptable_method_even_with_credentials():
    client = Socks5Client("example.com", 443, "u", "p", upstream="corp")
    with pytest.raises(Socks5Error, match="accepts neither") as err:
        client.receive_data(b"\x05\xff")
    assert err.value.code == "no_acceptable_method"


def test_method_not_offered():
    client = Socks5Client("example.com", 443)
    with pytest.raises(Socks5Error, match="not offered") as err:
        client.receive_data(b"\x05\x01")  # GSSAPI
    assert err.value.code == "protocol_error"


@pytest.mark.parametrize("stage", ["method", "auth", "reply"])
def test_bad_version_at_every_stage(stage):
    client = Socks5Client("example.com", 443, "u", "p")
    if stage == "method":
        data = b"HTTP/1.1 400 Bad Request\r\n"
    elif stage == "auth":
        data = METHOD_USERPASS + b"\x07\x00"
    else:
        data = METHOD_USERPASS + AUTH_OK + b"\x04\x5a"
    with pytest.raises(Socks5Error, match="not a SOCKS5 server") as err:
        client.receive_data(data)
    assert err.value.code == "bad_version"


def test_auth_reply_with_version_5_is_tolerated():
    client = Socks5Client("example.com", 443, "u", "p")
    events = client.receive_data(METHOD_USERPASS + b"\x05\x00")
    assert events[-1] == SendData(CONNECT_EXAMPLE)


def test_unknown_bound_address_type():
    client = Socks5Client("example.com", 443)
    with pytest.raises(Socks5Error, match="unknown address type"):
        client.receive_data(METHOD_NOAUTH + b"\x05\x00\x00\x09\x00")


def test_failed_client_refuses_more_bytes():
    client = Socks5Client("example.com", 443)
    with pytest.raises(Socks5Error):
        client.receive_data(b"\x04\x00")
    with pytest.raises(RuntimeError, match="failed"):
        client.receive_data(b"\x05\x00")


@pytest.mark.parametrize(
    ("creds", "before", "words"),
    [
        (None, b"", "configure \"username\" and \"password\" for upstream 'corp'"),
        (("u", "p"), b"", "check that it is a SOCKS5 server"),
        (("u", "p"), METHOD_USERPASS, "probably rejected them"),
        (None, METHOD_NOAUTH, "before answering CONNECT example.com:443"),
        (None, METHOD_NOAUTH + b"\x05\x00\x00", "before answering CONNECT"),
    ],
)
def test_eof_says_at_which_step(creds, before, words):
    client = Socks5Client("example.com", 443, *(creds or ()), upstream="corp")
    if before:
        client.receive_data(before)
    with pytest.raises(Socks5Error) as err:
        client.receive_data(b"")
    assert err.value.code == "server_closed"
    assert words in str(err.value) and "closed the connection" in str(err.value)
