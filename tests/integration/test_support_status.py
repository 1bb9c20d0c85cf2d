"""`sni-proxy check` tells "this kernel lacks it" from "these privileges may not", measured
for real: once without any capability (setpriv), once with a kernel feature this machine
really lacks (kprobes, when the kprobe PMU is absent)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.ebpf_required import require_ebpf, skip_or_fail

pytestmark = pytest.mark.ebpf

DROP_ALL = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all"]


def _check_json(prefix: list[str]) -> dict:
    r = subprocess.run([*prefix, sys.executable, "-m", "sniproxy.cli", "check", "--json"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def _status(report: dict) -> dict[str, str]:
    return {c["key"]: c["status"] for c in report["checks"]}


def test_without_capabilities_the_probes_say_not_permitted():
    require_ebpf()
    if shutil.which("setpriv") is None:
        skip_or_fail("setpriv (util-linux) is needed to drop capabilities")
    status = _status(_check_json(DROP_ALL))
    for key in ("map:lru_hash", "map:percpu_array", "prog:sk_skb", "cap:CAP_BPF"):
        assert status[key] == "not_permitted", (key, status[key])
    assert "not_supported" not in {status[k] for k in ("map:lru_hash", "prog:sk_skb")}


def test_a_kernel_without_kprobes_says_not_supported_even_as_root():
    require_ebpf()
    report = _check_json([])
    status = _status(report)
    assert status["map:lru_hash"] == "ok"
    if os.path.exists("/sys/bus/event_source/devices/kprobe"):
        assert status["attach:kprobe"] in ("ok", "not_permitted")
    else:
        assert status["attach:kprobe"] == "not_supported"
        kprobe = next(c for c in report["checks"] if c["key"] == "attach:kprobe")
        assert "CONFIG_KPROBES" in kprobe["fix"] + kprobe["detail"] + kprobe.get("disables", "")
