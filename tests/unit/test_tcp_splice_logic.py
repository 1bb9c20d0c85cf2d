"""tcp_splice pure logic: sequence deltas, keys, byte spans (no kernel involved)."""
from __future__ import annotations

import socket
import struct

import pytest

from sniproxy.ebpf import tcpsplice as ts

M = 0xFFFFFFFF


def side(local, peer, copied, queued, write, ts_base=0, tstamp=True, snd_ws=7, rcv_ws=7):
    facts = ts.TcpFacts(state=1, timestamps=tstamp, sack=True, snd_wscale=snd_ws,
                        rcv_wscale=rcv_ws, snd_mss=1448, advmss=1460, pmtu=1500)
    return ts.SpliceSide(local, peer, ts.RepairSnapshot(copied, queued, write, ts_base), facts)


def test_deltas_put_the_hand_over_between_write_seq_and_the_first_spliced_byte():
    # The client's first unread byte is 1000 (517 bytes queued: the hello); the backend's
    # next write is at 5_000_000 (after a PROXY header); the backend sent nothing yet.
    c = side(("10.0.0.1", 443), ("10.0.0.2", 40000), copied=1000, queued=517, write=77)
    b = side(("10.0.1.1", 50000), ("10.0.1.2", 8443), copied=9, queued=0, write=5_000_000)
    c2b, b2c = ts.flow_entries(c, b, c_out=3, b_out=4, c_neigh=True, b_neigh=False)
    # the hello (client seq 1000..1516) is written by user space at backend seq 5_000_000..;
    # the first spliced client byte (seq 1517) must land right after it
    assert (1517 + c2b.seq_delta) & M == 5_000_000 + 517
    # the backend's first byte (its seq 9) is the client's next byte from the proxy (77)
    assert (9 + b2c.seq_delta) & M == 77
    # ACKs: the client acking 77 means the backend's byte 9; the backend acking its
    # 5_000_000 + 517 means the client's 1517
    assert (77 + c2b.ack_delta) & M == 9
    assert (5_000_517 + b2c.ack_delta) & M == 1517
    assert b2c.handover_end == 5_000_000 + 517
    assert (c2b.ifindex, b2c.ifindex) == (4, 3)
    assert c2b.flags == ts.F_TSTAMP and b2c.flags == ts.F_TSTAMP | ts.F_NEIGH
    assert (c2b.src, c2b.dst, b2c.src, b2c.dst) == (b.local, b.peer, c.local, c.peer)


def test_deltas_wrap_around_the_sequence_space():
    c = side(("10.0.0.1", 443), ("10.0.0.2", 1), copied=M - 10, queued=0, write=M - 2)
    b = side(("10.0.1.1", 2), ("10.0.1.2", 3), copied=5, queued=0, write=20)
    c2b, b2c = ts.flow_entries(c, b, c_out=1, b_out=1, c_neigh=False, b_neigh=False)
    assert (M - 10 + c2b.seq_delta) & M == 20
    assert (M + 1 + c2b.seq_delta) & M == 31          # past the wrap
    assert ts.seq_span(M - 5, 10) == 16
    packed = c2b.pack(1, 2)
    assert len(packed) == 68


def test_timestamps_translated_only_when_both_connections_use_them():
    c = side(("10.0.0.1", 443), ("10.0.0.2", 1), 0, 0, 0, tstamp=False)
    b = side(("10.0.1.1", 2), ("10.0.1.2", 3), 0, 0, 0)
    c2b, b2c = ts.flow_entries(c, b, c_out=1, b_out=1, c_neigh=False, b_neigh=False)
    assert not c2b.flags & ts.F_TSTAMP and not b2c.flags & ts.F_TSTAMP


def test_window_shifts_map_sender_scale_to_receiver_scale():
    c = side(("10.0.0.1", 443), ("10.0.0.2", 1), 0, 0, 0, snd_ws=9, rcv_ws=7)
    b = side(("10.0.1.1", 2), ("10.0.1.2", 3), 0, 0, 0, snd_ws=6, rcv_ws=8)
    c2b, b2c = ts.flow_entries(c, b, c_out=1, b_out=1, c_neigh=False, b_neigh=False)
    # the client scales its window by the shift it announced (our client socket's snd_wscale);
    # the backend reads ours with the shift our backend socket announced (its rcv_wscale)
    assert (c2b.win_shift_in, c2b.win_shift_out) == (9, 8)
    assert (b2c.win_shift_in, b2c.win_shift_out) == (6, 7)


def test_keys_are_network_order_and_map_ipv4_mapped_addresses():
    key = ts.pack_key(("::ffff:10.0.0.2", 40000, 0, 0), ("10.0.0.1", 443))
    fam, s, d, sport, dport = struct.unpack("=B3x16s16sHH", key)
    assert fam == 4 and s[:4] == socket.inet_aton("10.0.0.2") and s[4:] == b"\0" * 12
    assert socket.ntohs(sport) == 40000 and socket.ntohs(dport) == 443
    with pytest.raises(ts.ArmError) as exc:
        ts.pack_key(("fd00::1", 1), ("10.0.0.1", 2))
    assert exc.value.reason == "family_mismatch"


def test_flow_state_round_trip():
    raw = ts.new_flow_value(3, 99, (10, 20))
    st = ts.FlowState.unpack(raw)
    assert (st.gen, st.nxt, st.bytes, st.reported) == (99, (10, 20), (0, 0), False)


def test_deadlines_fire_in_order_with_one_timer_and_refuse_an_earlier_one():
    import asyncio

    from sniproxy.relay.tcpsplice import Deadlines

    fired: list = []

    def fire(item):
        if item == "bad":
            raise RuntimeError("one flow's problem")
        fired.append(item)

    async def main():
        loop = asyncio.get_running_loop()
        d = Deadlines(fire)
        now = loop.time()
        assert d.add(now + 0.02, "a") and d.add(now + 0.02, "bad") and d.add(now + 0.05, "b")
        first_timer = d.timer
        assert not d.add(now + 0.01, "early"), "an earlier deadline than the last is refused"
        await asyncio.sleep(0.03)
        assert fired == ["a"] and d.timer is not first_timer      # "bad" raised, logged
        await asyncio.sleep(0.04)
        assert fired == ["a", "b"] and d.timer is None and not d.items
        d.add(loop.time() + 10, "c")
        d.cancel()
        assert d.timer is None and not d.items
    asyncio.run(main())


def test_handover_env_value_that_is_no_hand_over_is_named(monkeypatch, caplog):
    from sniproxy.relay import tcpsplice as relay_ts

    class NoReader:
        state_reader = None

    monkeypatch.setenv(relay_ts.HANDOVER_ENV, "pyhton")
    with caplog.at_level("WARNING", logger="sniproxy"):
        mode, why = relay_ts.handover_mode(NoReader())
    assert mode == "python" and "reader is off" in why      # the default's own choice
    assert "SNI_PROXY_HANDOVER='pyhton' is not a hand-over: use python or compiled" in caplog.text
    monkeypatch.setenv(relay_ts.HANDOVER_ENV, "python")
    assert relay_ts.handover_mode(NoReader()) == (
        "python", "SNI_PROXY_HANDOVER=python in the environment")
