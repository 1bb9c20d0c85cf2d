"""Tracers without kprobes: syscalls, TCP and memory (issue 12).

Library API (the seed's, in Python)::

    from sniproxy.observe.tracing import EbpfSyscallTracer, EbpfNetworkTracer, EbpfMemoryTracer
    with EbpfSyscallTracer(pid=1234) as t:
        ...
        print(t.snapshot().top(10), t.get_overhead())

`tracers_from_config(EbpfConfig)` builds the tracers its switches ask for.
"""
from .base import (TracerError, TracerOverhead, TracerPermissionDenied,  # noqa: F401
                   TracerUnsupported, overhead_report)
from .memory import EbpfMemoryTracer, MemorySnapshot  # noqa: F401
from .network import EbpfNetworkTracer, NetworkSnapshot, TcpEvent  # noqa: F401
from .syscalls import EbpfSyscallTracer, SyscallSnapshot, SyscallStat  # noqa: F401
from .from_config import tracers_from_config  # noqa: F401
