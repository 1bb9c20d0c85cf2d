"""ProfilerConfig (the seed's `EbpfConfig`): what the eBPF observability module is asked to do.

Named ProfilerConfig here so it never collides with the proxy config's `ebpf` section
(`sniproxy.config.EbpfConfig`); `EbpfConfig` stays importable from this module under the
seed's name for the library API.

An immutable value with builder methods, the Python shape of the seed's Rust API::

    config = ProfilerConfig().with_sample_rate(99).with_max_samples(20_000)
    config.validate()                       # raises ConfigValidationError
    prod = create_recommended_config("production")   # 19 Hz, CPU profiling only

Validation is pure except for reading the kernel's sample-rate ceiling and, for a cgroup target,
checking the path; both can be overridden so unit tests need no particular kernel.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from sniproxy.ebpf.cgroups import cgroup2_mounts  # re-exported: the library API had it here

#: The kernel refuses perf events above this rate; the profiler reads it at validation time.
PERF_MAX_SAMPLE_RATE_PATH = "/proc/sys/kernel/perf_event_max_sample_rate"

#: A frequency we refuse even when the kernel would accept it: at 1 kHz per CPU the BPF program
#: (4-6 us per sample measured here) costs ~0.5 % of a CPU by itself, and perf's own default
#: (4 kHz) is meant for short, targeted runs, not for an always-on profiler.
MAX_SAMPLE_RATE_HZ = 1000

#: Upper bound for max_samples. Each distinct sample keeps a key in a preallocated hash map and
#: the stack map is sized from it; past this the maps alone would cost hundreds of MB.
MAX_SAMPLES_LIMIT = 1_000_000

#: Size of the BPF hash of allowed process ids (the "pids" target); a list, not a fleet.
MAX_TARGET_PIDS = 64

DEFAULT_SAMPLE_RATE_HZ = 99
#: Distinct (process, thread, stacks) entries kept; see profiler.stack_map_entries() for memory.
DEFAULT_MAX_SAMPLES = 10_000


class ConfigValidationError(ValueError):
    """The config cannot be used; str() is one line per problem, each saying what to do."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class AllProcesses:
    """Sample every process on every CPU (the kernel idle task excluded)."""

    def describe(self) -> str:
        return "all processes"


@dataclass(frozen=True)
class Pids:
    """Sample only these processes (thread-group ids, as `ps` shows them)."""

    pids: tuple[int, ...]

    def describe(self) -> str:
        return "pid " + ",".join(str(p) for p in self.pids)


@dataclass(frozen=True)
class Cgroup:
    """Sample only tasks in this cgroup v2 directory (not its descendants)."""

    path: str

    def describe(self) -> str:
        return f"cgroup {self.path}"


@dataclass(frozen=True)
class CurrentProcess:
    """Sample the process that starts the profiler (resolved to its pid at start)."""

    def describe(self) -> str:
        return f"current process (pid {os.getpid()})"


Target = AllProcesses | Pids | Cgroup | CurrentProcess


@dataclass(frozen=True)
class ProfilerConfig:
    """What to observe and how often. Immutable: every `with_*` returns a new config."""

    sample_rate_hz: int = DEFAULT_SAMPLE_RATE_HZ
    enable_cpu_profiling: bool = True
    # Defaults follow the seed's ProfilerConfig::default(): network and syscall tracing on, memory off.
    enable_network_tracing: bool = True
    enable_syscall_tracing: bool = True
    enable_memory_tracing: bool = False
    max_samples: int = DEFAULT_MAX_SAMPLES
    target: Target = field(default_factory=AllProcesses)

    # -- builders -------------------------------------------------------------------------
    def with_sample_rate(self, hz: int) -> ProfilerConfig:
        return replace(self, sample_rate_hz=hz)

    def with_cpu_profiling(self, enabled: bool) -> ProfilerConfig:
        return replace(self, enable_cpu_profiling=enabled)

    def with_network_tracing(self, enabled: bool) -> ProfilerConfig:
        return replace(self, enable_network_tracing=enabled)

    def with_syscall_tracing(self, enabled: bool) -> ProfilerConfig:
        return replace(self, enable_syscall_tracing=enabled)

    def with_memory_tracing(self, enabled: bool) -> ProfilerConfig:
        return replace(self, enable_memory_tracing=enabled)

    def with_max_samples(self, n: int) -> ProfilerConfig:
        return replace(self, max_samples=n)

    def with_target(self, target: Target) -> ProfilerConfig:
        return replace(self, target=target)

    def with_all_processes(self) -> ProfilerConfig:
        return replace(self, target=AllProcesses())

    def with_pids(self, *pids: int) -> ProfilerConfig:
        return replace(self, target=Pids(tuple(pids)))

    def with_cgroup(self, path: str | os.PathLike[str]) -> ProfilerConfig:
        return replace(self, target=Cgroup(os.fspath(path)))

    def with_current_process(self) -> ProfilerConfig:
        return replace(self, target=CurrentProcess())

    # -- validation -----------------------------------------------------------------------
    def validate(self, kernel_max_sample_rate: int | None = None, check_paths: bool = True,
                 tracers: bool = False) -> None:
        """Raise ConfigValidationError listing every problem; return None when usable.

        `kernel_max_sample_rate` defaults to the running kernel's value; `check_paths=False`
        skips the filesystem check of a cgroup target (pure unit tests). `tracers=True` also
        checks that the target suits the enabled tracers (observe.tracing.tracers_from_config
        asks for it; the CPU profiler alone accepts any target).
        """
        problems: list[str] = []
        rate = self.sample_rate_hz
        if not _is_int(rate):
            problems.append(f"sample_rate_hz: got {rate!r}: expected an integer number of Hz, e.g. 99")
        elif rate <= 0:
            problems.append(
                f"sample_rate_hz: got {rate}: must be at least 1 Hz; "
                "use 19 Hz in production, 99 Hz for development (create_recommended_config)"
            )
        else:
            ceiling = kernel_max_sample_rate
            if ceiling is None:
                ceiling = read_kernel_max_sample_rate()
            if ceiling is not None and rate > ceiling:
                problems.append(
                    f"sample_rate_hz: got {rate}: above the kernel's limit {ceiling} Hz "
                    f"({PERF_MAX_SAMPLE_RATE_PATH}; the kernel lowers it when sampling takes too "
                    "long): choose a lower rate, 99 Hz is plenty for a CPU profile"
                )
            elif rate > MAX_SAMPLE_RATE_HZ:
                problems.append(
                    f"sample_rate_hz: got {rate}: above {MAX_SAMPLE_RATE_HZ} Hz the profiler itself "
                    "costs more than 0.5 % CPU per core; use 199 Hz (debug) or lower"
                )
        for name in ("enable_cpu_profiling", "enable_network_tracing",
                     "enable_syscall_tracing", "enable_memory_tracing"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                problems.append(f"{name}: got {value!r}: expected True or False")
        if tracers:
            problems.extend(_tracing_problems(self))
        n = self.max_samples
        if not _is_int(n):
            problems.append(f"max_samples: got {n!r}: expected an integer, e.g. 10000")
        elif n <= 0:
            problems.append(
                f"max_samples: got {n}: must be at least 1 (it bounds the distinct stacks kept; "
                f"{DEFAULT_MAX_SAMPLES} is the default)"
            )
        elif n > MAX_SAMPLES_LIMIT:
            problems.append(
                f"max_samples: got {n}: at most {MAX_SAMPLES_LIMIT} (the BPF maps are preallocated "
                "from it); shorten the profile or lower the rate instead"
            )
        problems.extend(_target_problems(self.target, check_paths))
        if problems:
            raise ConfigValidationError(problems)


def _tracing_problems(config: EbpfConfig) -> list[str]:
    """The tracers (observe/tracing) filter on one process in BPF; say so before they start."""
    target = config.target
    tracing = [name for name, on in (("network", config.enable_network_tracing),
                                     ("syscall", config.enable_syscall_tracing),
                                     ("memory", config.enable_memory_tracing)) if on is True]
    problems = []
    if isinstance(target, Pids) and len(set(target.pids)) > 1 and tracing:
        problems.append(
            f"target: {len(set(target.pids))} pids with {', '.join(tracing)} tracing on: the "
            "tracers follow one process (or a cgroup for syscalls); give one pid, or turn "
            "tracing off with with_network_tracing(False) etc. for a multi-process profile")
    if isinstance(target, Cgroup) and config.enable_memory_tracing is True:
        problems.append(
            "enable_memory_tracing: a cgroup target cannot be memory-traced (the tracer hooks "
            "one process's libc): use with_pids(PID) or with_memory_tracing(False)")
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _target_problems(target: object, check_paths: bool) -> list[str]:
    if isinstance(target, (AllProcesses, CurrentProcess)):
        return []
    if isinstance(target, Pids):
        if not target.pids:
            return ["target: empty pid list: give at least one pid, or use with_all_processes()"]
        problems = []
        bad = [p for p in target.pids if not _is_int(p) or p <= 0]
        if bad:
            problems.append(f"target: pids {bad!r}: a pid is a positive integer (see `ps`)")
        if len(set(target.pids)) > MAX_TARGET_PIDS:
            problems.append(
                f"target: {len(set(target.pids))} pids: at most {MAX_TARGET_PIDS}; "
                "profile a cgroup or all processes instead"
            )
        return problems
    if isinstance(target, Cgroup):
        if not check_paths:
            return []
        try:
            cgroup_id_of(target.path)
        except ConfigValidationError as exc:
            return exc.problems
        return []
    return [f"target: got {target!r}: expected AllProcesses, Pids, Cgroup or CurrentProcess"]


def read_kernel_max_sample_rate(path: str = PERF_MAX_SAMPLE_RATE_PATH) -> int | None:
    """The kernel's perf sample-rate ceiling, or None when it cannot be read (not Linux)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None


def cgroup_id_of(path: str) -> int:
    """The id bpf_get_current_cgroup_id() returns for tasks in `path`: its inode on cgroup2."""
    mounts = cgroup2_mounts()
    real = os.path.realpath(path)
    if not any(real == m or real.startswith(m.rstrip("/") + "/") for m in mounts):
        where = ", ".join(mounts) or "nowhere (no cgroup2 mounted)"
        raise ConfigValidationError([
            f"target: cgroup {path!r} is not in a cgroup v2 hierarchy (mounted at {where}); "
            "BPF sees v2 cgroup ids only: give a directory under a cgroup2 mount"
        ])
    try:
        st = os.stat(real)
    except OSError as exc:
        raise ConfigValidationError(
            [f"target: cgroup {path!r}: {exc.strerror}: create it or check the path"]
        ) from None
    return st.st_ino


# -- recommended configurations (seed: "sample frequency selection" table) -----------------
#: env -> (Hz, network, syscall, memory, max_samples). Production profiles CPU only at 19 Hz
#: (<0.5 % CPU); staging 49 Hz; development turns everything on at 99 Hz; debug 199 Hz (<2 %).
_RECOMMENDED: dict[str, tuple[int, bool, bool, bool, int]] = {
    "production": (19, False, False, False, DEFAULT_MAX_SAMPLES),
    "staging": (49, True, True, False, DEFAULT_MAX_SAMPLES),
    "development": (99, True, True, True, 20_000),
    "debug": (199, True, True, True, 20_000),
}
ENVIRONMENTS = tuple(_RECOMMENDED)


def _lookup(env: str) -> tuple[int, bool, bool, bool, int]:
    key = env.strip().lower() if isinstance(env, str) else env
    try:
        return _RECOMMENDED[key]
    except (KeyError, TypeError):
        raise ConfigValidationError([
            f"environment: got {env!r}: expected one of {', '.join(ENVIRONMENTS)}"
        ]) from None


def recommended_sample_rate(env: str) -> int:
    """Sampling frequency in Hz recommended for `env` (production, staging, development, debug)."""
    return _lookup(env)[0]


def create_recommended_config(env: str) -> ProfilerConfig:
    """The seed's recommended config for `env`; raises ConfigValidationError for unknown names."""
    hz, network, syscall, memory, max_samples = _lookup(env)
    return ProfilerConfig(
        sample_rate_hz=hz,
        enable_cpu_profiling=True,
        enable_network_tracing=network,
        enable_syscall_tracing=syscall,
        enable_memory_tracing=memory,
        max_samples=max_samples,
    )


# The seed's name for the library API (`EbpfConfig::default().with_sample_rate(99)`).
EbpfConfig = ProfilerConfig
