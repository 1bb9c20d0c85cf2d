"""The compiled tcp_splice hand-over (sniproxy.ebpf._handover) against its reference, the
Python path of relay/tcpsplice.py: on real loopback pairs in a network namespace of the test's
own (tc programs attached to its lo), the map entries it writes are byte-identical to
flow_entries(...).pack() + new_flow_value, and each staged refusal gives the same reason and
message on both paths and leaves nothing behind. Without the extension the proxy runs (the
Python hand-over) and /status says why.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import wait_until
from tests.integration.netns import Topology, run_in
from tests.integration.test_sockstate import reader  # noqa: F401  (fixture)
from tests.integration.test_tcp_splice import (
    HELLO, MiB, EchoBackend, Proxy, _tag, spliced, stream_sha, upload_download,
)
from tests.hidden_module import sitecustomize_hiding

pytestmark = pytest.mark.ebpf
ROW = 2                       # the ring index (counter row) the tests arm with


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture(scope="module")
def handover():
    try:
        from sniproxy.ebpf import _handover
    except ImportError as exc:
        pytest.fail(f"sniproxy.ebpf._handover is not built ({exc}): install gcc and "
                    "python3-dev, then `pip install -e .`")
    return _handover


@contextlib.contextmanager
def _data_path(reader, *, attach: bool):
    """A loopback namespace and the tcp_splice maps; with `attach`, the programs on its lo
    (then BPF counts the packets of an armed flow in its state)."""
    from sniproxy.ebpf import tcpsplice as ts
    with Topology.loopback(_tag()) as t:
        def load():
            dp = ts.TcpSpliceDataPath.load(16, rings=1)
            if attach:
                dp.attach(["lo"])
            return dp
        dp = run_in(t.proxy, load)
        dp.state_reader = reader
        try:
            yield t, dp
        finally:
            dp.state_reader = None           # the module's reader outlives this data path
            run_in(t.proxy, dp.close)


@pytest.fixture
def ns_dp(reader):
    with _data_path(reader, attach=True) as both:
        yield both


@pytest.fixture
def ns_maps(reader):
    """Maps only, no tc program: nothing but the hand-over writes to them."""
    with _data_path(reader, attach=False) as both:
        yield both


def _pair_sockets(hello: bytes = HELLO):
    """(client, proxy's client socket with `hello` queued, proxy's backend socket, backend),
    the proxy's two non-blocking as the server hands them over."""
    lc, lb = socket.socket(), socket.socket()
    lc.bind(("127.0.0.1", 0))
    lb.bind(("127.0.0.2", 0))
    lc.listen(1)
    lb.listen(1)
    client = socket.create_connection(lc.getsockname(), timeout=5)
    pc, _ = lc.accept()
    pb = socket.create_connection(lb.getsockname(), timeout=5)
    backend, _ = lb.accept()
    lc.close()
    lb.close()
    client.sendall(hello)
    pc.settimeout(5)
    assert pc.recv(len(hello), socket.MSG_PEEK | socket.MSG_WAITALL) == hello
    pc.setblocking(False)
    pb.setblocking(False)
    backend.settimeout(5)
    return client, pc, pb, backend


def _close(*socks):
    for s in socks:
        s.close()


def test_entries_are_byte_identical_to_the_python_reference(ns_maps, handover):
    from sniproxy.ebpf import tcpsplice as ts
    t, dp = ns_maps

    def body():
        lo = socket.if_nametoindex("lo")
        client, pc, pb, backend = _pair_sockets()
        try:
            cs, bs = dp.state_reader.read(pc), dp.state_reader.read(pb)
            c_side = ts.SpliceSide(cs.local, cs.peer, ts.snapshot_of(cs), ts.facts_of(cs))
            b_side = ts.SpliceSide(bs.local, bs.peer, ts.snapshot_of(bs), ts.facts_of(bs))
            c2b, b2c = ts.flow_entries(c_side, b_side, c_out=lo, b_out=lo,
                                       c_neigh=not ts.is_loopback(lo),
                                       b_neigh=not ts.is_loopback(lo))
            gen, routes = 0x8123_4567, {}

            def arm():
                return handover.arm(pc, pb.fileno(), dp.flows.fd, dp.state.fd, dp.claims.fd,
                                    routes, {lo}, 5, dp.max_flows, ROW, os.getpid(),
                                    gen)
            # The route cache is Python's: one request per address not in it, client first.
            for want in ("127.0.0.1", "127.0.0.2"):
                answer = arm()
                assert answer == ("route", socket.inet_aton(want), want)
                routes[answer[1]] = (lo, not ts.is_loopback(lo))
            before = time.monotonic_ns()
            tag, slot, c2b_key, b2c_key, b_start, c_start, data, sent, send_errno = arm()
            after = time.monotonic_ns()
            assert (tag, slot) == ("ok", 5)
            assert (c2b_key, b2c_key) == (c2b.key, b2c.key)
            # b2c went in on hold and came out of it: the final entry is flow_entries' own
            assert dp.flows.lookup(c2b_key) == c2b.pack(slot, gen)
            assert dp.flows.lookup(b2c_key) == b2c.pack(slot, gen)
            state = dp.state.lookup(slot)
            ref = ts.new_flow_value(ROW, gen, (b_side.snap.write_seq, c_side.snap.write_seq))
            # equal but for each direction's last_ns, the clock at arm
            ctr = dict(ts.FLOW_LAYOUT.offsets())["ctr"]
            last = [ctr + d * ts.CTR_LAYOUT.size + dict(ts.CTR_LAYOUT.offsets())["last_ns"]
                    for d in (0, 1)]

            def masked(raw: bytes) -> bytes:
                for at in last:
                    raw = raw[:at] + bytes(8) + raw[at + 8:]
                return raw
            assert masked(state) == masked(ref)
            for at in last:
                assert before <= struct.unpack_from("=Q", state, at)[0] <= after
            assert dp.claims.lookup(slot) == struct.pack("=II", os.getpid(), ROW)
            assert (b_start, c_start) == (b_side.snap.write_seq, c_side.snap.write_seq)
            assert (data, sent, send_errno) == (HELLO, len(HELLO), 0)
            assert pc.fileno() == -1, "the client socket was not handed to the C side"
            assert backend.recv(len(HELLO), socket.MSG_WAITALL) == HELLO
            for key in (c2b_key, b2c_key):
                dp.flows.delete(key)
            dp.release_slot(slot)
        finally:
            _close(client, pc, pb, backend)
    t.run(t.proxy, body)


def _stage(condition: str, dp, client, pc, pb, backend) -> None:
    from sniproxy.ebpf import tcpsplice as ts
    if condition == "backend_data_queued":
        backend.sendall(b"early")
        pb.settimeout(5)
        assert pb.recv(5, socket.MSG_PEEK | socket.MSG_WAITALL) == b"early"
        pb.setblocking(False)
    elif condition == "tuple_busy":
        # the backend direction's tuple still belongs to another (lingering) flow
        key = ts.pack_key(pb.getpeername(), pb.getsockname())
        dp.flows.update(key, b"\xff" * dp.flows.value_size)
    elif condition == "not_established":
        client.shutdown(socket.SHUT_WR)
        wait_until(lambda: dp.state_reader.read(pc).state != 1, 5, "the client's FIN")
    elif condition == "socket_error":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: dp.state_reader.read(pc).state == 7, 5, "the client's RST")
    elif condition == "interface_not_attached":
        pass                                   # the worker is told lo is not attached


class _Counters:
    def add(self, name: str, n: int = 1) -> None:
        pass


def _try(dp, mode: str, condition: str):
    """WorkerSplice.try_relay on a staged pair: (fallback (reason, message) or None, what is
    left in the maps, whether the client socket is still the proxy's)."""
    from sniproxy.ebpf import tcpsplice as ts
    from sniproxy.relay.tcpsplice import WorkerSplice

    class Worker(WorkerSplice):
        def _fallback(self, reason, message):
            self.refused = (reason, message)
            return None

    async def run():
        w = Worker(dp, None, ROW, _Counters(), linger_s=1, max_flows=dp.max_flows)
        w.handover = mode
        w.refused = None
        if condition == "interface_not_attached":
            w.dp = _NotAttached(dp)
        client, pc, pb, backend = _pair_sockets()
        try:
            _stage(condition, dp, client, pc, pb, backend)
            relay = w.try_relay(pc, pb, idle_timeout_s=60)
            if condition == "tuple_busy":
                dp.flows.delete(ts.pack_key(pb.getpeername(), pb.getsockname()))
            left = (dp.flows.count(), dp.claimed())
            if relay is not None:
                w.remove(relay)
            return w.refused, left, pc.fileno() != -1
        finally:
            w.close()
            _close(client, pc, pb, backend)
    return asyncio.run(run())


class _NotAttached:
    """The data path as a worker sees it, with no interface attached."""

    def __init__(self, dp):
        self._dp = dp

    def __getattr__(self, name):
        return getattr(self._dp, name)

    @property
    def ifindexes(self) -> set[int]:
        return set()


@pytest.mark.parametrize("condition", ["backend_data_queued", "tuple_busy", "not_established",
                                       "socket_error", "interface_not_attached"])
def test_each_refusal_is_the_python_paths_and_leaves_nothing(ns_dp, handover, condition):
    t, dp = ns_dp
    python = t.run(t.proxy, _try, dp, "python", condition)
    compiled = t.run(t.proxy, _try, dp, "compiled", condition)
    assert python[0] is not None and python[0][0] == condition, python
    assert compiled == python
    assert compiled[1] == (0, {}), "entries or a slot claim left behind"
    assert compiled[2], "a refused connection must stay the proxy's (next relay kind)"


def test_both_paths_arm_and_count_the_same(ns_dp, handover):
    t, dp = ns_dp
    for mode in ("python", "compiled"):
        refused, left, client_kept = t.run(t.proxy, _try, dp, mode, "ok")
        assert refused is None, (mode, refused)
        assert left[0] == 2 and len(left[1]) == 1, (mode, left)   # two entries, one claim
        assert not client_kept, mode


BLOCK_HANDOVER = sitecustomize_hiding('sniproxy.ebpf._handover')


def test_without_the_extension_the_python_hand_over_runs_and_status_says_so(
        reader, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCK_HANDOVER)
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.delenv("SNI_PROXY_HANDOVER", raising=False)
    with Topology.loopback(_tag()) as t:
        be = t.run(t.backend, EchoBackend, "127.0.0.2")
        proxy = Proxy(t, tmp_path, f"127.0.0.2:{be.port}")
        detail = proxy.ts()
        assert detail["handover"] == "python", (detail, proxy.log())
        assert "not built" in detail["handover_detail"], detail
        assert "hidden by the test" in detail["handover_detail"], detail
        got = t.run(t.client, upload_download, "127.0.0.1", proxy.port, MiB)
        assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
        spliced(proxy)
        assert "hand-over in Python" in proxy.log()
        proxy.wait_clean()
        assert proxy.stop() == 0


def _remove_case(dp, mode: str, handover) -> tuple[set[bytes], set[int], object]:
    """Flow 3 (generation 7) ended with two keys: the first still its own, the second taken
    over by flow 5 (a new connection on the same tuple); a third key was never inserted.
    Remove flow 3 by `mode`'s path -> (keys left, claimed slots left, the error text)."""
    from sniproxy.ebpf import tcpsplice as ts

    def entry(slot: int, gen: int) -> bytes:
        raw = bytearray(ts._DIR.size)
        struct.pack_into("=I", raw, 48, slot)      # sni_proxy_ts_dir.flow
        struct.pack_into("=I", raw, 64, gen)       # sni_proxy_ts_dir.gen
        assert ts._DIR.unpack(bytes(raw))[7] == slot and ts._DIR.unpack(bytes(raw))[14] == gen
        return bytes(raw)

    own, taken, absent = (bytes([n]) * 40 for n in (1, 2, 3))
    dp.flows.update(own, entry(3, 7), ts.BPF_ANY)
    dp.flows.update(taken, entry(5, 1), ts.BPF_ANY)
    for slot in (3, 5):
        dp.claims.update(slot, struct.pack("=II", os.getpid(), ROW), ts.BPF_ANY)
    problem = None
    if mode == "compiled":
        problem = handover.remove(dp.flows.fd, dp.claims.fd, (own, taken, absent), 3, 7)
    else:
        dp.delete_keys([own, taken, absent], 3, 7)
        dp.release_slot(3)
    left = {k for k, _ in dp.flows.items()}
    claimed = set(dp.claimed())
    for key in left:
        dp.flows.delete(key)
    for slot in claimed:
        dp.release_slot(slot)
    return left, claimed, problem


def test_remove_deletes_what_the_python_path_deletes(ns_maps, handover):
    """A flow's end (WorkerSplice.remove): only the keys still of its (slot, generation) go,
    then its slot claim; the compiled call and the Python reference leave the same maps."""
    t, dp = ns_maps
    python = t.run(t.proxy, _remove_case, dp, "python", handover)
    compiled = t.run(t.proxy, _remove_case, dp, "compiled", handover)
    assert python == ({bytes([2]) * 40}, {5}, None)
    assert compiled == python
    with pytest.raises(ValueError, match="40-byte"):
        handover.remove(dp.flows.fd, dp.claims.fd, (b"short",), 3, 7)
