"""The BPF filesystem: where pinned maps live so they outlive the process that made them.

One parser of /proc/self/mounts for every caller (`sni-proxy check`, DNS cache pinning), and
the one place that mounts it: `ensure_mounted`, called explicitly by the start-up code, which
logs what it did.
"""
from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("sniproxy")

DEFAULT = "/sys/fs/bpf"


def mount_of(path: str) -> tuple[str, str]:
    """(mount point, fs type) of the deepest mount containing path."""
    best = ("/", "")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                point = parts[1].replace("\\040", " ")
                if (path == point or path.startswith(point.rstrip("/") + "/")) \
                        and len(point) >= len(best[0]):
                    best = (point, parts[2])
    except OSError:
        pass
    return best


def is_bpffs(path: str = DEFAULT) -> bool:
    return mount_of(path)[1] == "bpf"


def ensure_mounted(pin_dir: str, why: str) -> str | None:
    """None when pin_dir is on a bpffs (mounting /sys/fs/bpf as root if needed), else why not.

    `why` names the config key that asked for pinning; it goes into the log line.
    """
    if is_bpffs(pin_dir):
        return None
    if not (pin_dir == DEFAULT or pin_dir.startswith(DEFAULT + "/")):
        return (f"{pin_dir} is not on a bpffs (mount one: `mount -t bpf bpf <dir>`, or use a "
                f"path under {DEFAULT})")
    if os.geteuid() != 0:
        return (f"bpffs is not mounted at {DEFAULT} and only root can mount it "
                f"(`sudo mount -t bpf bpf {DEFAULT}`)")
    r = subprocess.run(["mount", "-t", "bpf", "bpf", DEFAULT], capture_output=True,
                       text=True, timeout=10)
    if r.returncode != 0:
        return (f"bpffs is not mounted at {DEFAULT} and mounting it failed: "
                f"{r.stderr.strip() or r.returncode} (mounting needs CAP_SYS_ADMIN)")
    log.info("mounted bpffs at %s for %s", DEFAULT, why)
    return None
