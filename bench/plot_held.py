#!/usr/bin/env python3
"""Plot bench/held_connections.py results: memory per connection and total memory, per peer.

    bench/plot_held.py --results held.jsonl [--results more.jsonl] --out docs/held-connections.svg

Left: user + kernel bytes per connection (the proxy's PSS growth, plus its slab growth beyond
`direct` at the same N). Right: total memory the proxy is responsible for (MiB) against the
connections held, log scale on both axes. The last record of each (peer, N) wins. Standard
library only, like bench/plot_results.py.
"""
from __future__ import annotations

import argparse
import json
import math
from html import escape
from pathlib import Path

COLORS = {"nginx": "#2a9d8f", "haproxy": "#e76f51", "sniproxy:userspace": "#264653",
          "sniproxy:sockmap": "#8338ec", "sniproxy:tcp_splice": "#ffb703"}


def load(paths: list[Path]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("peer") == "direct" or "total_bytes_per_conn" not in r:
                continue
            out.setdefault(r["peer"], {})[r["n"]] = r
    return out


def total_mib(r: dict) -> float:
    return r["n"] * r["total_bytes_per_conn"] / 2**20 + r["proxy_pss_idle"] / 2**20


def svg(data: dict[str, dict[int, dict]]) -> str:
    w, h, pad = 900, 380, 60
    half = w // 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             '<rect width="100%" height="100%" fill="white"/>']
    ns = sorted({n for rows in data.values() for n in rows})
    # Left: bars of user + kernel bytes per connection at each N.
    peers = list(data)
    ymax = max(r["total_bytes_per_conn"] for rows in data.values() for r in rows.values()) * 1.15
    x0, y0, pw, ph = pad, h - pad, half - pad - 20, h - 2 * pad
    parts.append(f'<text x="{x0}" y="20">bytes per held connection (user + kernel)</text>')
    group = pw / max(1, len(ns))
    bar = group / (len(peers) + 1)
    for i, n in enumerate(ns):
        parts.append(f'<text x="{x0 + i * group + group / 2}" y="{y0 + 16}" text-anchor="middle">{n:,}</text>')
        for j, peer in enumerate(peers):
            r = data[peer].get(n)
            if r is None:
                continue
            x = x0 + i * group + j * bar + bar / 2
            user = max(0, r["user_bytes_per_conn"]) / ymax * ph
            kern = max(0, r["kernel_bytes_per_conn"] + r["skmem_bytes_per_conn"]) / ymax * ph
            color = COLORS.get(peer, "#999")
            parts.append(f'<rect x="{x:.1f}" y="{y0 - user:.1f}" width="{bar * 0.9:.1f}" height="{user:.1f}" fill="{color}"/>')
            parts.append(f'<rect x="{x:.1f}" y="{y0 - user - kern:.1f}" width="{bar * 0.9:.1f}" height="{kern:.1f}" '
                         f'fill="{color}" fill-opacity="0.45"/>')
    for k in range(0, int(ymax) + 1, 5000):
        y = y0 - k / ymax * ph
        parts.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{k // 1000}k</text>')
        parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
    parts.append(f'<text x="{x0}" y="{h - 15}" fill="#555">solid: user (PSS growth), light: kernel (slab beyond direct + skmem)</text>')
    # Right: total MiB vs connections, log-log.
    x0 = half + pad
    pw = half - pad - 20
    totals = [total_mib(r) for rows in data.values() for r in rows.values()]
    lo_n, hi_n = math.log10(min(ns)), math.log10(max(ns)) + 0.05
    lo_m, hi_m = math.log10(max(1, min(totals) * 0.7)), math.log10(max(totals) * 1.3)
    fx = lambda n: x0 + (math.log10(n) - lo_n) / max(1e-9, hi_n - lo_n) * pw   # noqa: E731
    fy = lambda m: y0 - (math.log10(m) - lo_m) / max(1e-9, hi_m - lo_m) * ph   # noqa: E731
    parts.append(f'<text x="{x0}" y="20">memory the proxy is responsible for (MiB) vs connections held</text>')
    for n in ns:
        parts.append(f'<text x="{fx(n):.1f}" y="{y0 + 16}" text-anchor="middle">{n:,}</text>')
    for m in (10, 30, 100, 300, 1000, 3000):
        if lo_m <= math.log10(m) <= hi_m:
            parts.append(f'<text x="{x0 - 6}" y="{fy(m) + 4:.1f}" text-anchor="end">{m}</text>')
            parts.append(f'<line x1="{x0}" x2="{x0 + pw}" y1="{fy(m):.1f}" y2="{fy(m):.1f}" stroke="#ddd"/>')
    for j, peer in enumerate(peers):
        rows = sorted(data[peer].items())
        color = COLORS.get(peer, "#999")
        pts = " ".join(f"{fx(n):.1f},{fy(total_mib(r)):.1f}" for n, r in rows)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for n, r in rows:
            parts.append(f'<circle cx="{fx(n):.1f}" cy="{fy(total_mib(r)):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<rect x="{x0 + 10}" y="{40 + 16 * j}" width="10" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x0 + 26}" y="{49 + 16 * j}">{escape(peer)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def table(data: dict[str, dict[int, dict]]) -> str:
    lines = ["| peer | N | open s | proxy CPU s | processes | PSS idle MiB | PSS held MiB | fds | user B/conn | "
             "kernel B/conn | total B/conn | total MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for peer, rows in data.items():
        for n, r in sorted(rows.items()):
            lines.append(
                f"| {peer} | {n:,} | {r['open_s']:.1f} | {r['proxy_cpu_open_s']:.2f} | {r['proxy_processes']} | "
                f"{r['proxy_pss_idle'] / 2**20:.1f} | {r['proxy_pss'] / 2**20:.1f} | {r['proxy_fds']:,} | "
                f"{r['user_bytes_per_conn']:,} | {r['kernel_bytes_per_conn'] + r['skmem_bytes_per_conn']:,} | "
                f"{r['total_bytes_per_conn']:,} | {total_mib(r):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, action="append", required=True)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    data = load(args.results)
    print(table(data))
    if args.out:
        args.out.write_text(svg(data))


if __name__ == "__main__":
    main()
