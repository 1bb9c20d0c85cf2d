#!/usr/bin/env python3
"""Turn one ../shared/bench run into the table and the SVG plot of docs/benchmarks.md.

    bench/plot_results.py --results /tmp/sni-bench/results.jsonl --run-id RUN --out docs/bench-RUN.svg

Per peer, medians over the run's repetitions of: keep-alive req/s, new conn/s, bulk MB/s (each
also as a ratio to `direct` of the same run), proxy CPU per 10k requests / 10k connections / GB,
and the machine-wide busy CPU per GB minus direct's (kworker and softirq time count: with the
sockmap the work moves from the proxy into kernel threads). Standard library only.
"""
from __future__ import annotations

import argparse
import json
import statistics
from html import escape
from pathlib import Path


def load(path: Path, run_id: str) -> dict[str, dict[str, list[dict]]]:
    """peer -> phase -> [measurement records] of one run."""
    out: dict[str, dict[str, list[dict]]] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") != "measurement" or rec.get("run_id") != run_id:
            continue
        if rec.get("status") != "ok":
            continue
        out.setdefault(rec["peer"], {}).setdefault(rec["phase"], []).append(rec)
    if not out:
        raise SystemExit(f"no measurement of run {run_id} in {path}")
    return out


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _has(rec: dict, count: str) -> bool:
    """The record has a proxy CPU figure and a non-zero divisor (`direct` has no proxy)."""
    return rec.get("proxy_cpu_s") is not None and bool(rec.get(count))


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, float | None]]:
    rows: dict[str, dict[str, float | None]] = {}
    for peer, phases in runs.items():
        ka, nc, bulk = phases.get("keepalive", []), phases.get("newconn", []), phases.get("bulk", [])
        rows[peer] = {
            "ka_rps": _median([r["rate"] for r in ka]),
            "nc_rps": _median([r["rate"] for r in nc]),
            "bulk_mbs": _median([r["mb_s"] for r in bulk]),
            "cpu_10k_req": _median([r["proxy_cpu_s"] / r["requests"] * 1e4 for r in ka if _has(r, "requests")]),
            "cpu_10k_conn": _median([r["proxy_cpu_s"] / r["requests"] * 1e4 for r in nc if _has(r, "requests")]),
            "cpu_gb": _median([r["proxy_cpu_s"] / (r["bytes"] / 1e9) for r in bulk if _has(r, "bytes")]),
            "machine_gb": _median([r["machine_busy_s"] / (r["bytes"] / 1e9) for r in bulk if r["bytes"]]),
        }
    direct = rows.get("direct", {})
    for row in rows.values():
        for key, ref in (("ka_rps", "ka_x"), ("nc_rps", "nc_x"), ("bulk_mbs", "bulk_x")):
            row[ref] = (row[key] / direct[key]) if row[key] and direct.get(key) else None
        row["machine_gb_extra"] = (row["machine_gb"] - direct["machine_gb"]
                                   if row["machine_gb"] is not None and direct.get("machine_gb") else None)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: dict[str, dict[str, float | None]]) -> str:
    lines = ["| peer | ka req/s | x direct | new conn/s | bulk MB/s | proxy CPU s/10k req "
             "| s/10k conn | s/GB | machine CPU s/GB over direct |",
             "|---|---|---|---|---|---|---|---|---|"]
    for peer, r in rows.items():
        lines.append(
            f"| {peer} | {_fmt(r['ka_rps'], ',.0f')} | {_fmt(r['ka_x'], '.2f')} | "
            f"{_fmt(r['nc_rps'], ',.0f')} | {_fmt(r['bulk_mbs'], ',.0f')} | "
            f"{_fmt(r['cpu_10k_req'], '.3f')} | {_fmt(r['cpu_10k_conn'], '.2f')} | "
            f"{_fmt(r['cpu_gb'], '.3f')} | {_fmt(r['machine_gb_extra'], '.2f')} |")
    return "\n".join(lines)


PANELS = (
    ("ka_x", "keep-alive req/s, x direct (higher is better)", "{:.2f}x"),
    ("cpu_10k_req", "proxy CPU s per 10k keep-alive requests", "{:.3f}"),
    ("cpu_10k_conn", "proxy CPU s per 10k new connections", "{:.2f}"),
    ("cpu_gb", "proxy CPU s per GB (bulk)", "{:.3f}"),
    ("machine_gb_extra", "machine CPU s per GB over direct (kworkers count)", "{:.2f}"),
)
COLORS = {"direct": "#7f7f7f", "nginx": "#2ca02c", "haproxy": "#1f77b4"}
OURS = ("#d62728", "#ff7f0e", "#9467bd", "#8c564b")


def svg(rows: dict[str, dict[str, float | None]], title: str) -> str:
    peers = list(rows)
    bar_h, gap, label_w, plot_w = 16, 4, 150, 330
    panel_h = 26 + len(peers) * (bar_h + gap)
    width, height = label_w + plot_w + 80, 40 + panel_h * len(PANELS)
    colors, ours = {}, iter(OURS)
    for p in peers:
        colors[p] = COLORS.get(p) or next(ours, "#17becf")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="8" y="22" font-size="14" font-weight="bold">{escape(title)}</text>']
    y = 40
    for key, label, fmt in PANELS:
        values = [rows[p][key] for p in peers]
        top = max([v for v in values if v is not None] + [1e-9])
        out.append(f'<text x="8" y="{y + 14}" font-weight="bold">{escape(label)}</text>')
        yy = y + 22
        for p, v in zip(peers, values):
            out.append(f'<text x="{label_w - 6}" y="{yy + 12}" text-anchor="end">{escape(p)}</text>')
            if v is not None:
                w = max(1.0, plot_w * max(v, 0) / top)
                out.append(f'<rect x="{label_w}" y="{yy}" width="{w:.1f}" height="{bar_h}" '
                           f'fill="{colors[p]}"/>')
                out.append(f'<text x="{label_w + w + 4:.1f}" y="{yy + 12}">{fmt.format(v)}</text>')
            else:
                out.append(f'<text x="{label_w + 4}" y="{yy + 12}" fill="#999">n/a</text>')
            yy += bar_h + gap
        y += panel_h
    out.append("</svg>")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=Path("/tmp/sni-bench/results.jsonl"))
    ap.add_argument("--run-id", required=True)
    ap.add_argument("--out", type=Path, help="SVG file to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    rows = summarize(load(args.results, args.run_id))
    print(markdown(rows))
    if args.out:
        args.out.write_text(svg(rows, args.title or f"../shared/bench run {args.run_id}"))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
