"""Layouts shared by a BPF program and Python, checked against the object's BTF at load time.

The C side is the source of truth: structs and enums live in the `bpf/*.h` / `*.bpf.c` files.
Python describes how it reads them (a `struct` format per member, names in enum order) and
`check_layouts` compares that description with the BTF that clang wrote into the object, so a
change on one side alone fails at load with a message naming the mismatch, instead of
silently misreading a map. `tests/unit/test_bpf_layouts.py` runs the same check on every built
object without loading anything (opening an object needs no privilege).

An enum only reaches BTF when something uses it as a type: each program declares a
`const volatile` anchor of the enum's type in .rodata (see `sni_proxy_common.h`).
"""
from __future__ import annotations

import errno
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from sniproxy.ebpf import libbpf as _lb
from sniproxy.ebpf.libbpf import BpfError


class LayoutMismatch(BpfError):
    """The Python description of a BPF struct or enum disagrees with the object's BTF."""

    def __init__(self, obj_name: str, detail: str) -> None:
        super().__init__(f"BPF layout check of {obj_name}", errno.EPROTO,
                         hint=f"{detail}; the C file and the Python module that reads it changed "
                              "apart: update the Python description (or rebuild with `make bpf` "
                              "if the object is stale)")


@dataclass(frozen=True)
class StructLayout:
    """A C struct read or written by Python: (member, struct-module code) in order.

    A code may start with pad bytes ("4xQ"): the C compiler's implicit padding before the
    member, so the member's offset is checked where C puts it (after the pad).
    """
    c_name: str
    members: tuple[tuple[str, str], ...]
    struct: struct.Struct = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "struct", struct.Struct("=" + "".join(c for _, c in self.members)))

    @property
    def size(self) -> int:
        return self.struct.size

    def offsets(self) -> list[tuple[str, int]]:
        out, offset = [], 0
        for name, code in self.members:
            pad = _LEADING_PAD.match(code)
            out.append((name, offset + (int(pad.group(1) or 1) if pad else 0)))
            offset += struct.calcsize("=" + code)
        return out

    def mismatch(self, btf: tuple[int, list[tuple[str, int]]] | None) -> str | None:
        if btf is None:
            return f"struct {self.c_name} is not in the object's BTF"
        size, members = btf
        if members != self.offsets() or size != self.size:
            return (f"struct {self.c_name}: BTF has size {size} and members "
                    f"{_fmt_members(members)}, Python reads size {self.size} and "
                    f"{_fmt_members(self.offsets())}")
        return None


@dataclass(frozen=True)
class EnumLayout:
    """A C enum whose values index something Python reads (e.g. per-CPU counter slots).

    `names` are the enumerators without `prefix`, lower-cased, in value order first, first+1,
    ...; `end` is the enumerator that counts them (e.g. STAT_MAX), if the C side has one.
    `c_names` (same length as `names`) spells the enumerators where Python's labels differ
    from C's (a metric label kept stable when the C name was shortened): the pairing is then
    explicit and still checked.
    """
    c_name: str
    prefix: str
    names: tuple[str, ...]
    end: str | None = None
    first: int = 0
    c_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.c_names is not None and len(self.c_names) != len(self.names):
            raise ValueError(f"enum {self.c_name}: {len(self.c_names)} C names for "
                             f"{len(self.names)} Python names")

    def value(self, name: str) -> int:
        """The C value of the enumerator Python calls `name`."""
        return self.first + self.names.index(name)

    def expected(self) -> list[tuple[str, int]]:
        spelled = self.c_names if self.c_names is not None else self.names
        out = [(self.prefix + n.upper(), self.first + i) for i, n in enumerate(spelled)]
        if self.end:
            out.append((self.end, self.first + len(self.names)))
        return out

    def mismatch(self, btf: list[tuple[str, int]] | None) -> str | None:
        if btf is None:
            return (f"enum {self.c_name} is not in the object's BTF (declare a `const volatile "
                    f"enum {self.c_name}` anchor in the C file)")
        if btf != self.expected():
            return (f"enum {self.c_name}: BTF has {_fmt_members(btf)}, Python expects "
                    f"{_fmt_members(self.expected())}")
        return None


# Pad bytes before a member's own code ("4xQ"); a member that is only padding ("3x", a C
# `__u8 pad[3]`) starts where it stands.
_LEADING_PAD = re.compile(r"(\d*)x(?=.)")


def _fmt_members(items: Iterable[tuple[str, int]]) -> str:
    return "{" + ", ".join(f"{n}={v}" for n, v in items) + "}"


def check_layouts(obj_ptr: int, obj_name: str,
                  layouts: Iterable[StructLayout | EnumLayout]) -> None:
    """Raise LayoutMismatch naming every layout that disagrees with an opened object's BTF."""
    problems = []
    for layout in layouts:
        if isinstance(layout, StructLayout):
            problem = layout.mismatch(_lb.object_btf_struct(obj_ptr, layout.c_name))
        else:
            problem = layout.mismatch(_lb.object_btf_enum(obj_ptr, layout.c_name))
        if problem:
            problems.append(problem)
    if problems:
        raise LayoutMismatch(obj_name, "; ".join(problems))
