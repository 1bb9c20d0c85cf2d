"""The supervisor's merge of the workers' metric files (prometheus_client multiprocess mode)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

# Multiprocess mode is process-wide state: run it in a child, not in the test process.
SCRIPT = textwrap.dedent("""
    import os, sys
    from sniproxy.telemetry import metrics
    directory = sys.argv[1]
    metrics.enable_multiprocess(directory)
    m = metrics.ProxyMetrics()
    m.connections.labels("a.test", "ok", "127.0.0.1:8443").inc(3)
    # What a worker's file looks like between its creation and its sizing
    # (prometheus_client issue #1199): the moment a worker starts.
    open(os.path.join(directory, "counter_4242.db"), "wb").close()
    body = metrics.render(metrics.aggregated_registry()).decode()
    line = [l for l in body.splitlines() if l.startswith("sniproxy_connections_total")]
    print(line[0])
""")


def test_a_worker_file_not_yet_sized_does_not_break_the_merge(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(" 3.0"), out.stdout
