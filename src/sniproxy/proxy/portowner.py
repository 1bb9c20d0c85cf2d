"""Who holds a TCP port: /proc/net/tcp{,6} gives the listening socket's inode, /proc/PID/fd the
process that has it open. For the start-up error "another process uses this port".
"""
from __future__ import annotations

import os

_TCP_LISTEN = "0A"


def listening_inodes(port: int) -> set[str]:
    """Inodes of the sockets listening on `port` (any address), from /proc/net/tcp and tcp6."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == _TCP_LISTEN and \
                            int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])
        except OSError:
            pass
    return inodes


def port_owners(port: int, max_pids: int = 100_000) -> list[tuple[int, str]]:
    """(pid, command line) of the processes holding a socket that listens on `port`.

    Only processes we may inspect are found (all of them as root); the scan is bounded.
    """
    wanted = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    owners: list[tuple[int, str]] = []
    if not wanted:
        return owners
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()][:max_pids]
    except OSError:
        return owners
    me = os.getpid()
    for pid in sorted(pids):
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    break
            except OSError:
                continue
        else:
            continue
        owners.append((pid, _cmdline(pid)))
    return owners


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _describe_owners(owners: list[tuple[int, str]]) -> str:
    """Forked workers (same command line as their parent) are named by their parent: the
    process to stop is the supervisor (another sni-proxy, nginx's master, ...)."""
    named: dict[int, str] = {}
    for pid, cmd in owners:
        parent = _parent(pid)
        if parent > 1 and _cmdline(parent) == cmd:
            named.setdefault(parent, f"pid {parent} ({cmd[:200]}) through its worker pid {pid}")
        else:
            named.setdefault(pid, f"pid {pid} ({cmd[:200]})")
    return "; ".join(list(named.values())[:4])


def port_in_use_hint(port: int, shared: bool) -> str:
    owners = port_owners(port)
    if owners:
        who = f"held by {_describe_owners(owners)}"
    else:
        who = "held by a process this user cannot inspect"
    if shared:
        return (f"{who}; listen_reuse_port_shared is true but that process did not set "
                "SO_REUSEPORT (or runs as another user): stop it or change listen_addr")
    return (f"{who}: stop it or change listen_addr; to share the port with it on purpose "
            "(SO_REUSEPORT on both) set \"listen_reuse_port_shared\": true")
