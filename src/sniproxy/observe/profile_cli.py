"""`sni-proxy profile`: the CPU profiler from the command line, in the spirit of bcc's profile.

    sni-proxy profile                       # all processes, 99 Hz, until Ctrl-C
    sni-proxy profile -p 1234 -F 49 --duration 30 -o cpu.svg
    sni-proxy profile --env production -o cpu.pb.gz   # 19 Hz; pprof for go tool pprof
    sni-proxy profile -p 1234 -o - --duration 5 > out.folded
    sni-proxy profile -p 1234 --duration 30 --otlp    # to the collector of OTEL_EXPORTER_OTLP_*
    sni-proxy profile --duration 30 --otlp-endpoint http://collector:4318 --otlp-protocol http/protobuf

Progress is shown on stderr while sampling; at the end a summary (samples, drops, lost stacks,
collisions, overhead) and the top functions. Exit status: 0 ok, 1 the profiler failed, 2 bad usage.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from typing import TextIO

from .config import ConfigValidationError, ProfilerConfig, create_recommended_config
from .profiler import EbpfCpuProfiler, Overhead, Profile, ProfilerError
from .signal_event import SignalSafeEvent

OUTPUT_KINDS = {".svg": "flame graph SVG", ".pb.gz": "pprof", ".pprof": "pprof",
                ".folded": "folded stacks", ".txt": "folded stacks"}


def _pids(text: str) -> list[int]:
    try:
        pids = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a pid or a comma-separated list") from None
    if not pids or any(p <= 0 for p in pids):
        raise argparse.ArgumentTypeError(f"{text!r}: a pid is a positive integer")
    return pids


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds, e.g. 10 or 0.5") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sni-proxy profile",
        description="Sample on-CPU stacks (kernel and user) with eBPF and report where time goes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""Output kind follows the -o suffix: .svg flame graph, .pb.gz/.pprof pprof,
.folded/.txt folded stacks, '-' folded stacks on stdout.

examples:
  sni-proxy profile 10                      # all processes for 10 s (bcc: profile 10)
  sni-proxy profile -F 99 -p 1234 -d 30 -o cpu.svg
  sni-proxy profile -p 1234 -o - > out.folded   # bcc: profile -f -p 1234
  sni-proxy profile --env production --cgroup /sys/fs/cgroup/system.slice/sni-proxy.service

differences from bcc's profile: the duration can also be given as -d S; folded stacks are
written with -o FILE.folded or -o - (bcc: -f); kernel and user frames always come together
(bcc's -U / -K filters: use the folded output's `_[k]` suffix); pprof and SVG outputs are
built in (bcc needs flamegraph.pl).""")
    p.add_argument("-p", "--pid", dest="pids", type=_pids, action="append", metavar="PID",
                   help="profile only this process (repeat or comma-separate; default: all)")
    p.add_argument("--cgroup", metavar="PATH", help="profile only tasks of this cgroup v2 directory")
    p.add_argument("-F", "--frequency", type=int, metavar="HZ",
                   help="samples per second per CPU (default: the --env rate, else 99)")
    p.add_argument("--env", metavar="ENV", default=None,
                   help="start from the recommended config: production (19 Hz), staging (49), "
                        "development (99), debug (199)")
    p.add_argument("-d", "--duration", type=_positive_float, metavar="S",
                   help="seconds to sample (default: until Ctrl-C, or until every -p process exits)")
    p.add_argument("duration_pos", nargs="?", type=_positive_float, metavar="duration",
                   help="seconds to sample, as bcc's profile takes it (same as -d)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the profile (see below)")
    p.add_argument("--top", type=int, default=10, metavar="N",
                   help="functions in the terminal table (0: none; default 10)")
    p.add_argument("--max-samples", type=int, metavar="N",
                   help="distinct stacks kept in the kernel (bounds memory; default from config)")
    p.add_argument("-I", "--include-idle", action="store_true", help="count the idle task too")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    p.add_argument("--metrics-file", metavar="FILE",
                   help="write the overhead (ebpf_profiler_overhead_cpu_percent, ebpf_profiler_overhead_memory_bytes) "
                        "every second in Prometheus text format, for node_exporter's textfile "
                        "collector; removed at exit")
    otlp = p.add_argument_group("OTLP", "send the profile to an OpenTelemetry collector (endpoint, "
                                "protocol, headers and TLS from the OTEL_EXPORTER_OTLP_* variables)")
    otlp.add_argument("--otlp", action="store_true", help="export the profile over OTLP")
    otlp.add_argument("--otlp-endpoint", metavar="URL",
                      help="collector URL (implies --otlp; default: OTEL_EXPORTER_OTLP_[PROFILES_]ENDPOINT, "
                           "else localhost:4317 for grpc)")
    otlp.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"),
                      help="default: OTEL_EXPORTER_OTLP_[PROFILES_]PROTOCOL, else grpc")
    otlp.add_argument("--otlp-pprof", action="store_true",
                      help="attach the pprof of each process as the profile's original_payload")
    return p


def output_kind(path: str) -> str | None:
    if path == "-":
        return "folded stacks"
    for suffix, kind in OUTPUT_KINDS.items():
        if path.endswith(suffix):
            return kind
    return None


def config_from_args(args: argparse.Namespace) -> ProfilerConfig:
    config = create_recommended_config(args.env) if args.env else ProfilerConfig()
    if args.frequency is not None:
        config = config.with_sample_rate(args.frequency)
    if args.max_samples is not None:
        config = config.with_max_samples(args.max_samples)
    if args.pids:
        config = config.with_pids(*sorted({p for group in args.pids for p in group}))
    elif args.cgroup:
        config = config.with_cgroup(args.cgroup)
    return config


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it no longer runs anything)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def format_summary(profile: Profile, overhead: Overhead) -> str:
    s = profile.stats
    seconds = profile.duration_ns / 1e9
    recorded = profile.total_samples
    lines = [
        f"Profiled {profile.target} at {profile.sample_rate_hz} Hz on {profile.cpus} CPUs "
        f"for {seconds:.1f} s.",
        f"samples {s.samples} (at most {profile.sample_rate_hz * seconds * profile.cpus:.0f} = "
        f"rate x duration x CPUs when every CPU is busy), recorded {recorded}, "
        f"dropped {s.dropped}, lost stacks {s.lost} (collisions {s.collisions}), "
        f"user-only {s.user_only}, kernel-only {s.kernel_only}",
        f"overhead: CPU {overhead.cpu_percent:.2f} % of {overhead.cpus} CPUs "
        f"(sampling {overhead.sampling_cpu_percent:.2f} %, BPF "
        f"{overhead.bpf_ns_per_sample / 1000:.1f} us/sample), memory "
        f"{overhead.memory_bytes / 1e6:.1f} MB (maps {overhead.map_memory_bytes / 1e6:.1f} MB, "
        f"symbols {overhead.symbol_cache_bytes / 1e6:.1f} MB)",
    ]
    if s.dropped:
        lines.append(f"warning: {s.dropped} samples dropped: max_samples distinct stacks reached; "
                     "raise --max-samples or shorten --duration")
    if s.collisions:
        lines.append(f"warning: {s.collisions} stacks lost to stack-map hash collisions (shown as "
                     "[lost ... stack]); raise --max-samples to get a bigger stack map")
    return "\n".join(lines)


def format_top(profile: Profile, n: int) -> str:
    total = profile.total_samples
    if n <= 0 or not total:
        return ""
    rows = [f"{'SELF%':>6} {'TOTAL%':>7} {'SAMPLES':>8}  {'FUNCTION':<40} MODULE"]
    for f in profile.top_functions(n):
        if not f.self_samples:      # ranked by self samples: the rest are only callers
            break
        rows.append(f"{100 * f.self_samples / total:6.1f} {100 * f.total_samples / total:7.1f} "
                    f"{f.self_samples:8d}  {f.name[:40]:<40} {f.module}")
    return "\n".join(rows)


def write_output(profile: Profile, path: str, title: str) -> None:
    from ..telemetry.flamegraph import render_flamegraph
    from ..telemetry.folded import fold, format_folded
    from ..telemetry.pprof import to_pprof

    kind = output_kind(path)
    if kind == "flame graph SVG":
        data: str | bytes = render_flamegraph(fold(profile), title=title, subtitle=(
            f"{profile.target}, {profile.sample_rate_hz} Hz, {profile.duration_ns / 1e9:.1f} s, "
            f"{profile.total_samples} samples"))
    elif kind == "pprof":
        data = to_pprof(profile)
    else:
        data = format_folded(fold(profile))
    if path == "-":
        sys.stdout.write(data if isinstance(data, str) else data.decode())
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def write_metrics_file(path: str, overhead: Overhead, samples: int) -> None:
    """The overhead as Prometheus text (the seed's alert: above 1 % CPU or 50 MB), atomically."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    Gauge("ebpf_profiler_overhead_cpu_percent", "Steady-state CPU cost of the eBPF profiler, percent of "
          "all CPUs", registry=registry).set(overhead.sampling_cpu_percent)
    Gauge("ebpf_profiler_overhead_memory_bytes", "Memory of the eBPF profiler: BPF maps and program "
          "plus symbol caches", registry=registry).set(overhead.memory_bytes)
    Gauge("ebpf_profiler_samples", "Samples taken since the profiler started",
          registry=registry).set(samples)
    write_to_textfile(path, registry)


def cli_profile(argv: list[str]) -> int:
    """Read as uvicorn's server: parse and validate, start, sample until told, report."""
    args, config = _parse_args(argv)
    err: TextIO = sys.stderr
    if config is None:
        return 2
    # Not a threading.Event: set() from the handler could deadlock (signal_event.py).
    stop = SignalSafeEvent()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    profiler = EbpfCpuProfiler(config, include_idle=args.include_idle)
    try:
        profiler.start()
    except ProfilerError as exc:
        print(f"sni-proxy profile: cannot start: {exc}", file=err)
        _restore(previous)
        stop.close()
        return 1
    try:
        end_reason = _sample_until_done(profiler, args, stop, err)
        profile = profiler.stop()
    finally:
        if profiler.running:
            profiler.stop()
        _restore(previous)
        stop.close()
        if args.metrics_file:
            # A stopped profiler costs nothing: stale figures would keep an alert firing.
            try:
                os.unlink(args.metrics_file)
            except OSError:
                pass
    print(f"Stopped ({end_reason}).", file=err)
    return _report(profile, profiler.get_overhead(), args, err)


def _parse_args(argv: list[str]):
    """(args, the validated ProfilerConfig), or (args, None) after printing why it is invalid.
    Usage errors exit with status 2 through argparse."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.duration_pos is not None:
        if args.duration is not None and args.duration != args.duration_pos:
            parser.error("give the duration once: either positional or -d")
        args.duration = args.duration_pos
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s",
                            stream=sys.stderr)
    if args.pids and args.cgroup:
        parser.error("-p and --cgroup exclude each other: choose processes or a cgroup")
    if args.output and output_kind(args.output) is None:
        parser.error(f"-o {args.output}: unknown output kind; use a name ending in "
                     f"{', '.join(OUTPUT_KINDS)}, or '-' for folded stacks on stdout")
    try:
        config = config_from_args(args)
        config.validate()
    except ConfigValidationError as exc:
        print(f"sni-proxy profile: invalid configuration:\n{exc}", file=sys.stderr)
        return args, None
    return args, config


def _sample_until_done(profiler: EbpfCpuProfiler, args, stop: SignalSafeEvent,
                       err: TextIO) -> str:
    """Wake once a second: duration, exited targets, the metrics file, a progress line.
    Returns why sampling ended."""
    pids = sorted({p for group in args.pids for p in group}) if args.pids else []
    deadline = time.monotonic() + args.duration if args.duration else None
    if not args.quiet:
        until = f"for {args.duration:g} s" if args.duration else "until Ctrl-C"
        print(f"Sampling {profiler.config.target.describe()} at "
              f"{profiler.config.sample_rate_hz} Hz {until}...", file=err)
    tty = err.isatty()
    last_line = 0.0
    end_reason = "Ctrl-C"
    while not stop.is_set():
        timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        if stop.wait(timeout):
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            end_reason = "duration reached"
            break
        if pids and not any(_alive(p) for p in pids):
            end_reason = "every profiled process exited"
            break
        if args.metrics_file:
            try:
                write_metrics_file(args.metrics_file, profiler.get_overhead(),
                                   profiler.stats().samples)
            except OSError as exc:
                print(f"sni-proxy profile: cannot write {args.metrics_file}: {exc.strerror}",
                      file=err)
        # Progress: a live line on a terminal, a line every 10 s in a log.
        if not args.quiet and (tty or now - last_line >= 10):
            last_line = now
            s = profiler.stats()
            o = profiler.get_overhead()
            line = (f"{profiler.elapsed_s():6.1f} s  samples {s.samples}  dropped {s.dropped}"
                    f"  lost {s.lost}  cpu {o.sampling_cpu_percent:.2f} %")
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=err, flush=True)
    if tty and not args.quiet:
        print(file=err)
    return end_reason


def _report(profile, overhead, args, err: TextIO) -> int:
    """The summary, the -o file, the OTLP export and the top table; the exit status."""
    print(format_summary(profile, overhead), file=err)
    if args.output:
        try:
            write_output(profile, args.output, title="CPU Flame Graph")
        except OSError as exc:
            print(f"sni-proxy profile: cannot write {args.output}: {exc.strerror}: "
                  "check the directory exists and is writable", file=err)
            return 1
        if args.output != "-":
            print(f"wrote {output_kind(args.output)} to {args.output}", file=err)
    if args.otlp or args.otlp_endpoint:
        status = export_otlp(profile, args, err)
        if status:
            return status
    top = format_top(profile, args.top)
    if top:
        print(top, file=err if args.output == "-" else sys.stdout)
    return 0


def export_otlp(profile: Profile, args: argparse.Namespace, err: TextIO) -> int:
    """Send the profile as an ExportProfilesServiceRequest; 0 on success, 1 with the reason."""
    from opentelemetry.sdk.resources import OTELResourceDetector

    from ..telemetry.otlp_common import OtlpSetupError
    from ..telemetry.otlp_profiles import OtlpProfileExporter, ProfileExportError

    try:
        exporter = OtlpProfileExporter.from_env(endpoint=args.otlp_endpoint, protocol=args.otlp_protocol)
    except OtlpSetupError as exc:
        print(f"sni-proxy profile: OTLP: {exc}", file=err)
        return 2
    try:
        sent = exporter.export(profile, include_pprof=args.otlp_pprof,
                               resource_attributes=dict(OTELResourceDetector().detect().attributes))
    except ProfileExportError as exc:
        print(f"sni-proxy profile: OTLP export failed: {exc}", file=err)
        return 1
    finally:
        exporter.close()
    print(f"exported {profile.total_samples} samples of {len(profile.tgids)} process(es) "
          f"({sent} bytes) over {exporter.settings.protocol} to {exporter.endpoint}", file=err)
    return 0


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
