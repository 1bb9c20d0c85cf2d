"""A serving worker freezes its start-up objects and collects its young generation less often
(worker_process.tune_gc; the figures are in its comment and docs/benchmarks.md)."""
from __future__ import annotations

import subprocess
import sys


def test_tune_gc_freezes_start_up_objects_and_raises_the_first_threshold():
    code = ("import gc\n"
            "from sniproxy.proxy.worker_process import WORKER_GC_THRESHOLDS, tune_gc\n"
            "assert gc.get_threshold() == (700, 10, 10), gc.get_threshold()\n"
            "before = gc.get_freeze_count()\n"
            "tune_gc()\n"
            "assert gc.get_threshold() == WORKER_GC_THRESHOLDS\n"
            "assert WORKER_GC_THRESHOLDS[0] > 700\n"
            "assert gc.get_freeze_count() > before + 10_000, gc.get_freeze_count()\n"
            "assert gc.isenabled()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
