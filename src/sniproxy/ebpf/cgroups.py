"""cgroup v2, as BPF sees it: where the hierarchy is mounted and which cgroup we are in.

BPF programs attach to v2 cgroups and see v2 cgroup ids only; a hybrid host (v1 controllers
plus a v2 tree at /sys/fs/cgroup/unified) has one too.
"""
from __future__ import annotations

from pathlib import Path


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of cgroup v2 hierarchies (there may be one at /sys/fs/cgroup/unified)."""
    points = []
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return points
    for line in lines:
        pre, _, post = line.partition(" - ")
        if post.split(" ", 1)[0] == "cgroup2":
            points.append(pre.split(" ")[4])
    return points


def own_cgroup2_dir(cgroup_file: str = "/proc/self/cgroup",
                    mountinfo: str = "/proc/self/mountinfo") -> str:
    """The directory of this process's v2 cgroup. Raises OSError saying what is missing."""
    mounts = cgroup2_mounts(mountinfo)
    if not mounts:
        raise OSError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    rel = None
    for line in Path(cgroup_file).read_text().splitlines():
        if line.startswith("0::"):
            rel = line[3:]
            break
    if rel is None:
        raise OSError(f"{cgroup_file} has no v2 line (0::PATH)")
    # Several mounts of one hierarchy are possible: the first where the directory exists.
    for point in mounts:
        path = point.rstrip("/") + "/" + rel.lstrip("/")
        if Path(path).is_dir():
            return path.rstrip("/") or "/"
    raise OSError(f"this process's cgroup {rel!r} is not visible under {', '.join(mounts)} "
                  "(a cgroup namespace without its own cgroup2 mount?)")
