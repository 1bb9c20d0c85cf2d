"""A TCP socket's state in one system call: getsockopt answered by a BPF program.

The tcp_splice hand-over needs, per socket, the addresses, the sequence numbers (including
copied_seq, the first byte user space has not read), the TCP timestamp offset and the
negotiated options. Without BPF that is TCP_INFO, getsockname, getpeername, TIOCOUTQ and a
TCP_REPAIR session (10-12 system calls, each wrapped in Python). The program in
`bpf/sni_proxy_sockstate.bpf.c`, attached to this process's cgroup (v2), answers
getsockopt(SOL_TCP, SOCKSTATE_OPT) with all of it, read under the socket lock.

    reader = SocketStateReader.open()       # BpfError/OSError: use the TCP_REPAIR path
    state = reader.read(sock)               # SocketState, or None (socket not answered)
    reader.close()

Workers forked after open() use the same attachment. Every other getsockopt in the cgroup
costs the program's first comparison.
"""
from __future__ import annotations

import errno
import os
import socket

from sniproxy.ebpf.cgroups import own_cgroup2_dir
from sniproxy.ebpf.layout import StructLayout
from sniproxy.ebpf.libbpf import BPF_CGROUP_GETSOCKOPT
from sniproxy.ebpf.objects import BpfObject
from sniproxy.ebpf.support import CAP_PERFMON, CAP_SYS_ADMIN, effective_capabilities

OBJECT = "sni_proxy_sockstate"
PROGRAM = "sni_proxy_sst"
SOCKSTATE_OPT = 0x5e1f0001
SS_TIMESTAMPS, SS_SACK, SS_WSCALE, SS_USEC_TS = 1, 2, 4, 8

LAYOUT = StructLayout("sni_proxy_sockstate", (
    ("local_addr", "16s"), ("peer_addr", "16s"), ("local_port", "H"), ("peer_port", "H"),
    ("family", "B"), ("state", "B"), ("options", "B"), ("wscale", "B"),
    ("copied_seq", "I"), ("rcv_nxt", "I"), ("write_seq", "I"), ("snd_una", "I"),
    ("tsoffset", "I"), ("snd_mss", "I"), ("advmss", "I"), ("pmtu", "I"),
))
LAYOUTS = (LAYOUT,)
_UNPACK = LAYOUT.struct.unpack
_SIZE = LAYOUT.size


class SocketState:
    """What the program read from one TCP socket (see struct sni_proxy_sockstate)."""

    __slots__ = ("family", "local16", "peer16", "local_port", "peer_port", "state",
                 "options", "wscale", "copied_seq", "rcv_nxt", "write_seq", "snd_una",
                 "tsoffset", "snd_mss", "advmss", "pmtu")

    def __init__(self, raw: bytes):
        (self.local16, self.peer16, self.local_port, self.peer_port, self.family, self.state,
         self.options, self.wscale, self.copied_seq, self.rcv_nxt, self.write_seq,
         self.snd_una, self.tsoffset, self.snd_mss, self.advmss, self.pmtu) = _UNPACK(raw)

    @property
    def queued(self) -> int:
        """Bytes received and not read yet (SIOCINQ)."""
        return (self.rcv_nxt - self.copied_seq) & 0xFFFFFFFF

    @property
    def unacked(self) -> int:
        """Bytes written and not acknowledged yet (TIOCOUTQ)."""
        return (self.write_seq - self.snd_una) & 0xFFFFFFFF

    def _host(self, addr16: bytes) -> str:
        if self.family == 4:
            return socket.inet_ntop(socket.AF_INET, addr16[:4])
        return socket.inet_ntop(socket.AF_INET6, addr16)

    @property
    def local(self) -> tuple[str, int]:
        return self._host(self.local16), self.local_port

    @property
    def peer(self) -> tuple[str, int]:
        return self._host(self.peer16), self.peer_port


class SocketStateReader:
    """The loaded program and its cgroup link."""

    def __init__(self, obj: BpfObject, cgroup: str):
        self.obj = obj
        self.cgroup = cgroup

    @classmethod
    def open(cls, cgroup: str | None = None) -> "SocketStateReader":
        """Load the program and attach it to `cgroup` (default: this process's v2 cgroup),
        then check it answers on a socket of ours. Raises BpfError / OSError saying why."""
        caps = effective_capabilities()
        if not caps & (1 << CAP_PERFMON | 1 << CAP_SYS_ADMIN):
            # The program reads struct tcp_sock through an untrusted pointer: the verifier
            # allows that with CAP_PERFMON only (it would say "permission denied" at insn 0).
            raise OSError(errno.EPERM, "CAP_PERFMON is missing (the program reads the "
                          "kernel's struct tcp_sock); grant it like CAP_BPF")
        cgroup = cgroup or own_cgroup2_dir()
        obj = BpfObject(OBJECT, layouts=LAYOUTS)
        try:
            obj.load()
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                obj.program(PROGRAM).attach_cgroup(fd, BPF_CGROUP_GETSOCKOPT, cgroup)
            finally:
                os.close(fd)
            reader = cls(obj, cgroup)
            reader._self_test()
            return reader
        except BaseException:
            obj.close()
            raise

    def _self_test(self) -> None:
        """A connected pair on loopback must read back as what getsockname/TCP says."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname(), timeout=2) as c:
                c.sendall(b"x")
                s, _ = listener.accept()
                with s:
                    state = self.read(s)
                    if state is None:
                        raise OSError(errno.ENOPROTOOPT, f"the program attached to {self.cgroup} "
                                      "did not answer for this process's sockets (created in "
                                      "another cgroup?)")
                    if (state.local, state.peer) != (s.getsockname(), s.getpeername()):
                        raise OSError(errno.EPROTO, f"read {state.local} -> {state.peer}, the "
                                      f"socket is {s.getsockname()} -> {s.getpeername()}")

    def read(self, sock: socket.socket) -> SocketState | None:
        """One getsockopt. None: the program did not answer (ENOPROTOOPT: the socket belongs
        to a cgroup the program is not attached to); other OSErrors propagate."""
        try:
            return SocketState(sock.getsockopt(socket.IPPROTO_TCP, SOCKSTATE_OPT, _SIZE))
        except OSError as exc:
            if exc.errno == errno.ENOPROTOOPT:
                return None
            raise

    def close(self) -> None:
        self.obj.close()
