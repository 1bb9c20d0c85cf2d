"""EbpfConfig switches -> tracers (the seed's with_network/syscall/memory_tracing)."""
from __future__ import annotations

import os

from ..config import AllProcesses, Cgroup, CurrentProcess, EbpfConfig, Pids, cgroup_id_of
from .base import BaseTracer
from .memory import EbpfMemoryTracer
from .network import EbpfNetworkTracer
from .syscalls import EbpfSyscallTracer


def tracers_from_config(config: EbpfConfig) -> list[BaseTracer]:
    """The tracers `config` enables, not started. Targets: a single pid (Pids of one, or the
    current process) filters every tracer; a cgroup filters the syscall tracer; all
    processes traces syscalls and TCP machine-wide and memory of the current process
    (memory tracing follows one process: it hooks that process's libc)."""
    config.validate(tracers=True)
    target = config.target
    pid: int | None = None
    cgroup_id: int | None = None
    if isinstance(target, CurrentProcess):
        pid = os.getpid()
    elif isinstance(target, Pids) and len(set(target.pids)) == 1:
        pid = target.pids[0]
    elif isinstance(target, Cgroup):
        cgroup_id = cgroup_id_of(target.path)
    else:
        assert isinstance(target, (AllProcesses, Pids))
    out: list[BaseTracer] = []
    if config.enable_syscall_tracing:
        out.append(EbpfSyscallTracer(pid=pid, cgroup_id=cgroup_id,
                                     max_keys=min(max(config.max_samples, 512), 1 << 20)))
    if config.enable_network_tracing:
        out.append(EbpfNetworkTracer(pid=pid, max_events=config.max_samples))
    if config.enable_memory_tracing:
        out.append(EbpfMemoryTracer(pid=pid or os.getpid()))
    return out
