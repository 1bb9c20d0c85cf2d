"""Network namespaces for tests that attach tc programs (never in the root namespace).

    with Topology.three(tag) as t:          # client <-veth-> proxy <-veth-> backend
        backend = t.run(t.backend, RawBackend, host=t.backend_ip)
        t.run(t.client, fn)                 # fn runs in a thread inside the client namespace

A thread that entered a namespace creates its sockets there, and threads it starts inherit
it (namespaces are per task), so a RawBackend built inside `run` serves from that namespace.
Names carry the test process id: parallel agents on this machine never collide.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from dataclasses import dataclass, field

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=check)


def nsexec(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def proxy_prefix(ns: str) -> list[str]:
    """argv prefix that runs a proxy in netns `ns` as it runs on a host. `ip netns exec`
    mounts a fresh /sys in a mount namespace of its own, which hides the host's cgroup2
    mount; the proxy's cgroup BPF program (tcp_splice's socket reader) needs one to attach,
    so it is mounted again there (private to that mount namespace)."""
    return ["ip", "netns", "exec", ns, "sh", "-c",
            'mount -t cgroup2 none /sys/fs/cgroup || exit 97; exec "$@"', "sh"]


def run_in(ns: str, fn, *args, timeout: float = 600, **kwargs):
    """fn(*args, **kwargs) in a fresh thread inside netns `ns`; its result or its exception."""
    out: dict = {}

    def body():
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns})")
            finally:
                os.close(fd)
            out["value"] = fn(*args, **kwargs)
        except BaseException as exc:      # handed to the caller
            out["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {ns} did not finish in {timeout}s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


@dataclass
class Topology:
    tag: str
    namespaces: list[str] = field(default_factory=list)
    client: str = ""
    proxy: str = ""
    backend: str = ""
    # addresses (IPv4, IPv6) per role
    client_ip: str = "127.0.0.1"
    proxy_client_ip: str = "127.0.0.1"   # where the proxy listens
    backend_ip: str = "127.0.0.2"
    client_ip6: str = "::1"
    proxy_client_ip6: str = "::1"
    backend_ip6: str = "::1"
    links: dict[str, tuple[str, str]] = field(default_factory=dict)   # name -> (ns, ifname)

    def add_ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        nsexec(name, "ip", "link", "set", "lo", "up")
        return name

    @classmethod
    def loopback(cls, tag: str) -> "Topology":
        """One namespace: client, proxy and backend all on its lo."""
        t = cls(tag)
        ns = t.add_ns(f"tsl{tag}")
        t.client = t.proxy = t.backend = ns
        return t

    @classmethod
    def three(cls, tag: str, *, mtu_client: int = 1500, mtu_backend: int = 1500) -> "Topology":
        """client (10.71.1.2) -- proxy (10.71.1.1 | 10.71.2.1) -- backend (10.71.2.2)."""
        t = cls(tag)
        t.client = t.add_ns(f"tsc{tag}")
        t.proxy = t.add_ns(f"tsp{tag}")
        t.backend = t.add_ns(f"tsb{tag}")
        for side, peer_ns, net, mtu in (("c", t.client, 1, mtu_client),
                                        ("b", t.backend, 2, mtu_backend)):
            outer, inner = f"t{side}{tag}p", f"t{side}{tag}x"   # proxy end, far end
            sh("ip", "link", "add", outer, "mtu", str(mtu), "netns", t.proxy, "type", "veth",
               "peer", "name", inner, "mtu", str(mtu), "netns", peer_ns)
            nsexec(t.proxy, "ip", "addr", "add", f"10.71.{net}.1/24", "dev", outer)
            nsexec(t.proxy, "ip", "addr", "add", f"fd71:{net}::1/64", "dev", outer, "nodad")
            nsexec(t.proxy, "ip", "link", "set", outer, "up")
            nsexec(peer_ns, "ip", "addr", "add", f"10.71.{net}.2/24", "dev", inner)
            nsexec(peer_ns, "ip", "addr", "add", f"fd71:{net}::2/64", "dev", inner, "nodad")
            nsexec(peer_ns, "ip", "link", "set", inner, "up")
            nsexec(peer_ns, "ip", "route", "add", "default", "via", f"10.71.{net}.1")
            nsexec(peer_ns, "ip", "-6", "route", "add", "default", "via", f"fd71:{net}::1")
            t.links[side] = (peer_ns, inner)
            t.links[f"proxy_{side}"] = (t.proxy, outer)
        t.client_ip, t.proxy_client_ip, t.backend_ip = "10.71.1.2", "10.71.1.1", "10.71.2.2"
        t.client_ip6, t.proxy_client_ip6, t.backend_ip6 = "fd71:1::2", "fd71:1::1", "fd71:2::2"
        return t

    def run(self, ns: str, fn, *args, **kwargs):
        return run_in(ns, fn, *args, **kwargs)

    def tc_state(self, ns: str | None = None) -> str:
        """Every tc filter and clsact qdisc in the proxy namespace (empty when clean)."""
        ns = ns or self.proxy
        out = []
        links = nsexec(ns, "ip", "-o", "link", "show").stdout
        for line in links.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            for hook in ("ingress", "egress"):
                filt = nsexec(ns, "tc", "filter", "show", "dev", name, hook, check=False).stdout
                if filt.strip():
                    out.append(f"{name} {hook}: {filt.strip()}")
            q = nsexec(ns, "tc", "qdisc", "show", "dev", name).stdout
            if "clsact" in q:
                out.append(f"{name}: {q.strip()}")
        return "\n".join(out)

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            # Killing what still runs there first: a namespace with a process keeps existing.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
