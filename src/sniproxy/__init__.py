"""sni-proxy: a TLS SNI proxy whose data path runs in the kernel through eBPF."""

__version__ = "0.1.0"
