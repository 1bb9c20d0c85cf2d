"""The observability module (seed 004): ProfilerConfig (the seed's EbpfConfig), the eBPF CPU profiler, its symbolizer, tracers.

Knows nothing about the proxy: it uses `sniproxy.ebpf` to load programs and is used by the
proxy (continuous profiling, tracer metrics) and by the `sni-proxy profile` / `trace` commands.
"""
