"""Folded stacks, Brendan Gregg's format: one line per stack, `root;...;leaf count`.

This is the input of flamegraph.pl, speedscope, inferno and our own flamegraph.py. Kernel frames
carry the `_[k]` suffix (as stackcollapse-perf.pl --kernel writes them) so renderers can colour
them apart; the process name is the root frame, as bcc's `profile -f` does.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

KERNEL_SUFFIX = "_[k]"


class _Frame(Protocol):
    label: str
    kernel: bool


class _Sample(Protocol):
    comm: str
    tgid: int
    count: int

    def stack(self) -> Iterable[_Frame]: ...


class _Profile(Protocol):
    samples: list


def frame_text(label: str, kernel: bool) -> str:
    """One frame as folded text: `;` separates frames and newlines separate stacks."""
    text = label.replace(";", ":").replace("\n", " ")
    return text + KERNEL_SUFFIX if kernel else text


def fold(profile: _Profile, include_comm: bool = True, include_pid: bool = False) -> dict[str, int]:
    """Stacks of `profile` (root first) -> sample count, merged across threads."""
    out: dict[str, int] = {}
    for sample in profile.samples:
        parts = []
        if include_comm:
            root = sample.comm.replace(";", ":").replace(" ", "_") or "[unknown]"
            parts.append(f"{root}-{sample.tgid}" if include_pid else root)
        parts.extend(frame_text(f.label, f.kernel) for f in sample.stack())
        key = ";".join(parts)
        out[key] = out.get(key, 0) + sample.count
    return out


def format_folded(stacks: Mapping[str, int]) -> str:
    """Sorted lines, as stackcollapse scripts write them (stable output, easy to diff)."""
    return "".join(f"{stack} {count}\n" for stack, count in sorted(stacks.items()) if count > 0)


def parse_folded(text: str) -> dict[str, int]:
    """Inverse of format_folded; also reads other tools' folded files (count after last space)."""
    out: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        stack, sep, count = line.rpartition(" ")
        if not sep or not count.isdigit():
            raise ValueError(f"folded line {lineno}: {line[:80]!r}: expected 'frame;frame COUNT'")
        out[stack] = out.get(stack, 0) + int(count)
    return out
