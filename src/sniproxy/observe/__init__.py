"""The observability module (seed 004): ProfilerConfig (the seed's EbpfConfig), the eBPF CPU profiler, its symbolizer, tracers.

Knows nothing about the proxy: it uses `sniproxy.ebpf` to load programs and is used by the
proxy (continuous profiling, tracer metrics) and by the `sni-proxy profile` / `trace` commands.
"""

# The seed's library names (`otlp::ebpf::{EbpfCpuProfiler, EbpfConfig}`), imported on first use
# so that `import sniproxy.observe.config` alone never loads libbpf.
_EXPORTS = {
    "EbpfConfig": "sniproxy.observe.config",
    "ProfilerConfig": "sniproxy.observe.config",
    "create_recommended_config": "sniproxy.observe.config",
    "EbpfCpuProfiler": "sniproxy.observe.profiler",
    "ProfilerError": "sniproxy.observe.profiler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_EXPORTS[name]), name)
