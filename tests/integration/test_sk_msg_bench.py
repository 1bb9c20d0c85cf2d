"""bench/sk_msg_vs_sk_skb.py for real, small: every design byte-exact, and the sk_msg program
never sees the bytes that arrive from the network (only what the relay send()s)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ebpf_required import require_ebpf

pytestmark = pytest.mark.ebpf
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "sk_msg_vs_sk_skb.py"
SIZE_MIB = 16


@pytest.fixture(autouse=True, scope="module")
def _ebpf():
    require_ebpf()


@pytest.fixture(scope="module")
def bench_output() -> dict[str, dict]:
    """The script's JSON lines, by design name (and "check" for the sk_msg claim)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--size-mib", str(SIZE_MIB), "--reps", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line.get("design", "check"): line for line in lines}


def test_every_design_is_byte_exact(bench_output):
    assert set(bench_output) == {"check", "direct", "sk_skb", "sk_msg", "copy"}
    for design in ("direct", "sk_skb", "sk_msg", "copy"):
        row = bench_output[design]
        assert row["exact"], row
        (run,) = row["runs"]
        assert run["bytes"] == SIZE_MIB << 20 and run["mismatch_at"] is None, run


def test_sk_msg_program_sees_no_bytes_from_the_network(bench_output):
    check = bench_output["check"]
    assert check["exact"], check
    assert check["arrived_unread_bytes"] == 1 << 20, check
    assert check["program_bytes_before_send"] == 0 and check["program_msgs_before_send"] == 0
    # What it sees is exactly what the relay sent on the socket, nothing more.
    assert check["program_bytes_after_send"] == check["relayed_bytes"] == 1 << 20


def test_programs_count_what_they_moved(bench_output):
    size = SIZE_MIB << 20
    (skb_run,) = bench_output["sk_skb"]["runs"]
    # sk_skb redirected every received byte itself; sk_msg saw each byte once, on send().
    assert skb_run["program"]["up_bytes"] == skb_run["relayed"] == size, skb_run
    (msg_run,) = bench_output["sk_msg"]["runs"]
    assert msg_run["program"]["bytes"] == msg_run["relayed"] == size, msg_run
    assert msg_run["program"]["no_peer"] == msg_run["program"]["redirect_fail"] == 0, msg_run
