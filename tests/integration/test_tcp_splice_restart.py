"""A whole proxy (supervisor and workers) killed with SIGKILL while a spliced transfer runs,
with the flow maps pinned (ebpf.tcp_splice.pin_path): the transfer goes on without any
proxy process, a new proxy started on the same pins takes the flow over (its filters replace
the old ones atomically and use the same maps), the rest of the transfer goes through the new
programs, sha256-exact, and the new proxy removes the flow once it ended; a clean stop leaves
no filter, qdisc, program or pin behind.
"""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading

import pytest

from tests.ebpf_required import require_ebpf
from tests.integration.harness import send_pattern, wait_until
from tests.integration.netns import Topology, nsexec, sh
from tests.integration.test_tcp_splice import (
    HELLO, MiB, EchoBackend, Proxy, _recv_exact, _tag, stream_sha,
)

pytestmark = pytest.mark.ebpf


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture
def three_ns():
    with Topology.three(_tag()) as t:
        yield t


@pytest.fixture
def bpffs(tmp_path):
    """A bpffs of this test's own, visible to every `ip netns exec` child (which hides
    /sys/fs/bpf behind a fresh sysfs)."""
    path = tmp_path / "bpffs"
    path.mkdir()
    sh("mount", "-t", "bpf", "bpf", str(path))
    try:
        yield path
    finally:
        sh("umount", "-l", str(path), check=False)


def test_sigkill_of_the_whole_proxy_pinned_flows_survive_and_a_new_proxy_takes_over(
        three_ns, tmp_path, bpffs):
    t = three_ns
    pin = str(bpffs / "tcp_splice")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    backend = f"{t.backend_ip}:{be.port}"
    proxy = Proxy(t, tmp_path, backend, workers=2, tcp_splice={"pin_path": pin})
    assert sorted(os.listdir(pin)) == ["claims", "flows", "state"]
    phase = 4 * MiB
    go = threading.Event()
    progress = {"n": 0}
    out: dict = {}

    def start_client():
        s = socket.create_connection((t.proxy_client_ip, proxy.port), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO)
        assert _recv_exact(s, len(HELLO)) == HELLO

        def sender():
            send_pattern(s, phase)
            go.wait(60)
            # the pattern repeats every 128 KiB and phase is a multiple: one stream
            send_pattern(s, phase)
            s.shutdown(socket.SHUT_WR)

        def reader():
            h = hashlib.sha256(HELLO)
            try:
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    h.update(chunk)
                    progress["n"] += len(chunk)
                out["sha"] = h.hexdigest()
            except OSError as exc:
                out["error"] = exc
        threads = [threading.Thread(target=f, daemon=True) for f in (sender, reader)]
        for th in threads:
            th.start()
        return s, threads
    sock, threads = t.run(t.client, start_client)
    try:
        wait_until(lambda: proxy.ts()["active_flows"] == 1, 10, "the flow spliced")
        os.killpg(proxy.p.proc.pid, signal.SIGKILL)
        proxy.p.proc.wait(10)
        # No proxy process at all: the first half still goes both ways, in the kernel.
        wait_until(lambda: progress["n"] >= phase, 30, "the first half echoed with no proxy")
        again = Proxy(t, tmp_path, backend, workers=2, tcp_splice={"pin_path": pin})
        assert "took over 1 live flow" in again.log(), again.log()
        assert (again.ts()["pin_path"], again.ts()["inherited_flows"]) == (pin, 1)
        assert "its flows go on" in again.log()
        wait_until(lambda: "watching flow slot" in again.log(), 10, "the flow adopted")
        go.set()                       # the second half goes through the new proxy's programs
        for th in threads:
            th.join(60)
        assert "error" not in out, out
        assert out["sha"] == stream_sha(HELLO, 2 * phase)
        results = be.wait(1)
        assert results[0][:2] == (len(HELLO) + 2 * phase, stream_sha(HELLO, 2 * phase))
        # The new proxy removes the ended flow (after the linger) from the pinned maps.
        again.wait_clean()
        assert again.metric("ebpf_map_utilization", map="tcp_splice") == 0
        assert again.metric("ebpf_tcp_splice_engaged_total") == 0    # adopted, not engaged
        # And it splices new connections on the same maps.
        from tests.integration.test_tcp_splice import upload_download
        got = t.run(t.client, upload_download, t.proxy_client_ip, again.port, MiB)
        assert got == (len(HELLO) + MiB, stream_sha(HELLO, MiB))
        again.wait_clean()
        assert again.stop() == 0
    finally:
        sock.close()
    assert t.tc_state() == "", "tc filters or the clsact qdisc left behind"
    assert not os.path.exists(pin), os.listdir(pin)
    assert "tcx" not in nsexec(t.proxy, "bpftool", "net").stdout
    assert "sni_proxy" not in nsexec(t.proxy, "bpftool", "net").stdout


def test_a_second_proxy_on_the_same_pins_leaves_the_running_one_alone(three_ns, tmp_path, bpffs):
    t = three_ns
    pin = str(bpffs / "tcp_splice")
    be = t.run(t.backend, EchoBackend, t.backend_ip)
    proxy = Proxy(t, tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"pin_path": pin})
    s = t.run(t.client, socket.create_connection, (t.proxy_client_ip, proxy.port), 10)
    try:
        s.sendall(HELLO)
        assert _recv_exact(s, len(HELLO)) == HELLO
        wait_until(lambda: proxy.ts()["active_flows"] == 1, 10, "the flow spliced")
        # The same pin directory from another namespace (a copy-pasted config):
        second = Proxy(Topology(tag=t.tag, client=t.client, proxy=t.client, backend=t.backend,
                                proxy_client_ip="127.0.0.1"),
                       tmp_path, f"{t.backend_ip}:{be.port}", tcp_splice={"pin_path": pin})
        st = second.status()["ebpf"]
        assert st["tcp_splice"] == "disabled"
        assert "belong to running process" in st["reasons"]["tcp_splice"], st["reasons"]
        assert second.stop() == 0
        assert sorted(os.listdir(pin)) == ["claims", "flows", "state"]
        s.sendall(b"still spliced")
        assert _recv_exact(s, 13) == b"still spliced"
    finally:
        s.close()
    proxy.wait_clean()
    assert proxy.stop() == 0
    assert not os.path.exists(pin)
