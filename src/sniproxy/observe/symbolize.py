"""Turn raw stack addresses into function names, in user space.

* Kernel addresses: /proc/kallsyms (text symbols, sorted once, bisected).
* User addresses: the process's /proc/PID/maps (snapshotted as soon as the process is seen, so a
  process that exits before symbolization still resolves), then the ELF file's `.symtab` and
  `.dynsym` through pyelftools. An address becomes a file offset through its mapping and a
  virtual address through the file's PT_LOAD segments, which handles PIE executables and shared
  libraries the same way. Symbol tables are cached per file, keyed by build-id when present.
* Nothing is dropped: an address with no symbol becomes `[unknown] module+0xoffset`.
"""
from __future__ import annotations

import bisect
import logging
import os
import sys
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

log = logging.getLogger(__name__)

#: ELF files whose symbols stay cached; least recently used beyond this are dropped.
MAX_CACHED_FILES = 256
#: Processes whose maps snapshot is kept (exited ones included) before the oldest is dropped.
MAX_PROCESSES = 4096
#: A zero-size symbol (hand-written assembly) is trusted this far past its start, no further.
UNSIZED_SYMBOL_SPAN = 4096
KERNEL_MODULE = "[kernel.kallsyms]"


@dataclass(frozen=True)
class Frame:
    """One symbolized stack frame."""

    name: str | None   # function name; None when no symbol covers the address
    module: str        # file basename, "[kernel.kallsyms]" or "[<kernel module>]"
    address: int       # runtime address as sampled
    offset: int        # offset in the module (file offset for user code)
    kernel: bool

    @property
    def label(self) -> str:
        """Name for humans: the function, or `[unknown] module+0xoffset` (never empty)."""
        if self.name:
            return self.name
        if self.module:
            return f"[unknown] {self.module}+0x{self.offset:x}"
        return f"[unknown] 0x{self.address:x}"


@dataclass(frozen=True)
class Mapping:
    """An executable line of /proc/PID/maps."""

    start: int
    end: int
    file_offset: int
    path: str
    inode: int


class KernelSymbols:
    """/proc/kallsyms as sorted arrays; loaded on first use.

    ~120k symbols: names live in one bytes blob with an offsets array (about 4 MB) instead of
    120k Python strings (about 12 MB), since this cache counts in the profiler's overhead.
    """

    def __init__(self, path: str = "/proc/kallsyms"):
        self._path = path
        self._addrs: array | None = None
        self._name_offsets = array("I")
        self._names = b""
        self._module_index = array("H")
        self._modules: list[str] = [""]
        self._stext = 0
        self.memory_bytes = 0

    def _load(self) -> None:
        rows: list[tuple[int, bytes, bytes]] = []
        with open(self._path, "rb") as f:
            for raw in f:
                parts = raw.split()
                if len(parts) < 3 or parts[1] not in (b"t", b"T", b"w", b"W"):
                    continue
                addr = int(parts[0], 16)
                if addr == 0:       # kptr_restrict hides addresses: nothing usable
                    continue
                rows.append((addr, parts[2], parts[3][1:-1] if len(parts) > 3 else b""))
                if parts[2] == b"_stext":
                    self._stext = addr
        rows.sort()
        self._addrs = array("Q", (r[0] for r in rows))
        module_ids: dict[bytes, int] = {b"": 0}
        offsets, blob, pos = array("I"), [], 0
        for _, name, module in rows:
            offsets.append(pos)
            blob.append(name)
            pos += len(name)
            if module not in module_ids:
                module_ids[module] = len(module_ids)
                self._modules.append(module.decode())
            self._module_index.append(module_ids[module])
        offsets.append(pos)
        self._name_offsets = offsets
        self._names = b"".join(blob)
        self.memory_bytes = (len(self._names) + offsets.itemsize * len(offsets)
                             + self._addrs.itemsize * len(self._addrs)
                             + self._module_index.itemsize * len(self._module_index))
        if not rows:
            log.warning("no kernel symbols readable in %s (kptr_restrict?): kernel frames will "
                        "show as addresses; run as root or set kernel.kptr_restrict=0", self._path)

    def frame(self, address: int) -> Frame:
        if self._addrs is None:
            self._load()
        assert self._addrs is not None
        i = bisect.bisect_right(self._addrs, address) - 1
        if i < 0:
            return Frame(None, KERNEL_MODULE, address, address - self._stext, True)
        module = self._modules[self._module_index[i]]
        name = self._names[self._name_offsets[i]:self._name_offsets[i + 1]].decode()
        return Frame(sys.intern(name), f"[{module}]" if module else KERNEL_MODULE, address,
                     address - self._addrs[i], True)


class ElfSymbols:
    """Function symbols and load segments of one ELF file."""

    def __init__(self, path: str):
        self.path = path
        self.build_id: str | None = None
        self.has_symtab = False
        segments: list[tuple[int, int, int]] = []
        funcs: dict[int, tuple[int, str]] = {}
        with open(path, "rb") as f:
            elf = ELFFile(f)
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    segments.append((seg["p_offset"], seg["p_filesz"], seg["p_vaddr"]))
                elif seg["p_type"] == "PT_NOTE":
                    for note in seg.iter_notes():
                        if note["n_type"] == "NT_GNU_BUILD_ID":
                            self.build_id = note["n_desc"]
            # .symtab when present (not stripped) has local functions too; .dynsym is what a
            # stripped distribution library (Debian's libc) still carries.
            for section_name in (".dynsym", ".symtab"):
                section = elf.get_section_by_name(section_name)
                if section is None:
                    continue
                self.has_symtab |= section_name == ".symtab"
                for sym in section.iter_symbols():
                    if sym["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC"):
                        continue
                    if sym["st_value"] == 0 or sym["st_shndx"] == "SHN_UNDEF":
                        continue
                    name = sym.name
                    if "@" in name:  # versioned: memcpy@@GLIBC_2.14 -> memcpy
                        name = name.split("@", 1)[0]
                    value, size = sym["st_value"], sym["st_size"]
                    # Prefer the sized, global, shorter name when aliases share an address.
                    old = funcs.get(value)
                    if old is None or (old[0] == 0 and size) or (size == old[0] and len(name) < len(old[1])):
                        funcs[value] = (size, sys.intern(name))
        self.segments = sorted(segments)
        starts = sorted(funcs)
        self._starts = array("Q", starts)
        self._sizes = array("Q", (funcs[s][0] for s in starts))
        self._names = [funcs[s][1] for s in starts]
        self.memory_bytes = (
            self._starts.buffer_info()[1] * 16 + sys.getsizeof(self._names)
            + sum(sys.getsizeof(n) for n in self._names)
        )

    def vaddr_of_file_offset(self, file_offset: int) -> int | None:
        for p_offset, p_filesz, p_vaddr in self.segments:
            if p_offset <= file_offset < p_offset + p_filesz:
                return file_offset - p_offset + p_vaddr
        return None

    def symbol(self, vaddr: int) -> str | None:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i < 0:
            return None
        start, size = self._starts[i], self._sizes[i]
        span = size if size else UNSIZED_SYMBOL_SPAN
        return self._names[i] if vaddr < start + span else None


def read_maps(pid: int) -> list[Mapping]:
    """Executable file mappings of `pid` (empty when the process is gone)."""
    out = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(None, 5)
        if len(fields) < 6 or "x" not in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        out.append(Mapping(start, end, int(fields[2], 16), fields[5], int(fields[4])))
    return out


class Symbolizer:
    """Symbolizes kernel and user stacks; owns bounded caches of maps and ELF files."""

    def __init__(self, kallsyms_path: str = "/proc/kallsyms",
                 max_files: int = MAX_CACHED_FILES, max_processes: int = MAX_PROCESSES):
        self.kernel = KernelSymbols(kallsyms_path)
        self._max_files = max_files
        self._max_processes = max_processes
        self._maps: OrderedDict[int, list[Mapping]] = OrderedDict()
        self._files: OrderedDict[str, ElfSymbols | None] = OrderedDict()   # cache key -> symbols
        self._file_keys: dict[tuple, str] = {}    # (path, dev, inode, mtime) -> cache key

    # -- processes ------------------------------------------------------------------------
    def snapshot_process(self, pid: int) -> bool:
        """Keep `pid`'s maps now, so it can be symbolized after it exits. False if gone."""
        if pid in self._maps:
            self._maps.move_to_end(pid)
            return True
        maps = read_maps(pid)
        if not maps:
            return False
        self._maps[pid] = maps
        while len(self._maps) > self._max_processes:
            self._maps.popitem(last=False)
        return True

    def refresh_process(self, pid: int) -> bool:
        """Re-read a live process's maps (libraries loaded since); keeps the old if gone."""
        maps = read_maps(pid)
        if not maps:
            return pid in self._maps
        self._maps[pid] = maps
        self._maps.move_to_end(pid)
        return True

    def has_process(self, pid: int) -> bool:
        return pid in self._maps

    # -- frames ---------------------------------------------------------------------------
    def kernel_frames(self, ips: list[int]) -> list[Frame]:
        """Frames leaf first, as the stack map stores them."""
        return [self.kernel.frame(ip if i == 0 else ip - 1) for i, ip in enumerate(ips)]

    def user_frames(self, pid: int, ips: list[int]) -> list[Frame]:
        """Frames leaf first; return addresses (all but the leaf) are looked up at ip-1 so a
        call as the last instruction of a function is attributed to its caller."""
        if pid not in self._maps:
            self.snapshot_process(pid)
        maps = self._maps.get(pid, [])
        starts = [m.start for m in maps]
        frames = []
        for i, ip in enumerate(ips):
            lookup = ip if i == 0 else ip - 1
            j = bisect.bisect_right(starts, lookup) - 1
            if j < 0 or lookup >= maps[j].end:
                frames.append(Frame(None, "", ip, ip, False))
                continue
            m = maps[j]
            file_offset = lookup - m.start + m.file_offset
            module = os.path.basename(m.path.removesuffix(" (deleted)"))
            name = None
            elf = self._elf(pid, m)
            if elf is not None:
                vaddr = elf.vaddr_of_file_offset(file_offset)
                if vaddr is not None:
                    name = elf.symbol(vaddr)
            frames.append(Frame(name, module, ip, ip - m.start + m.file_offset, False))
        return frames

    # -- ELF cache ------------------------------------------------------------------------
    def _elf(self, pid: int, m: Mapping) -> ElfSymbols | None:
        if not m.path.startswith("/"):      # [vdso], [heap], anonymous JIT code
            return None
        path = m.path.removesuffix(" (deleted)")
        # The process's own view of the file (other mount namespace, deleted binary), then ours.
        candidates = [f"/proc/{pid}/root{path}", path]
        for candidate in candidates:
            try:
                st = os.stat(candidate)
            except OSError:
                continue
            stat_key = (path, st.st_dev, st.st_ino, st.st_mtime_ns)
            key = self._file_keys.get(stat_key)
            if key is not None and key in self._files:
                self._files.move_to_end(key)
                return self._files[key]
            try:
                elf = ElfSymbols(candidate)
            except (OSError, ELFError, ValueError) as exc:
                log.debug("cannot read symbols of %s: %s", candidate, exc)
                elf = None
            key = f"build-id:{elf.build_id}" if elf and elf.build_id else repr(stat_key)
            if key in self._files and self._files[key] is not None:
                elf = self._files[key]      # same build-id seen through another path
            self._file_keys[stat_key] = key
            self._files[key] = elf
            self._files.move_to_end(key)
            while len(self._files) > self._max_files:
                evicted, _ = self._files.popitem(last=False)
                self._file_keys = {k: v for k, v in self._file_keys.items() if v != evicted}
            return elf
        return None

    def memory_bytes(self) -> int:
        """Bytes held by the symbol caches (kernel table, ELF tables, maps snapshots)."""
        total = self.kernel.memory_bytes
        total += sum(e.memory_bytes for e in self._files.values() if e is not None)
        total += sum(sys.getsizeof(v) + sum(sys.getsizeof(m) + sys.getsizeof(m.path) for m in v)
                     for v in self._maps.values())
        return total
