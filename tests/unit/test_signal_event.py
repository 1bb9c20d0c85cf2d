"""SignalSafeEvent: what `sni-proxy trace` / `profile` wait on until Ctrl-C, set from a real
signal handler at every moment of the main thread's wait (threading.Event deadlocked there)."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sniproxy.observe.signal_event import SignalSafeEvent

SRC = str(Path(__file__).resolve().parents[2] / "src")

# The trace commands' own _Stopper, its loop made as tight as it gets (wait(0): the main thread
# spends its time in Python inside wait(), where a handler that takes a lock the waiting code
# holds never returns). With threading.Event in _Stopper, 14 of 30 such children never exited.
_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from sniproxy.observe.trace_cli import _Stopper
stopper = _Stopper(None)
print("ready", flush=True)
n = 0
while not stopper.wait(0):
    n += 1
print("stopped", flush=True)
"""
#: Children to interrupt (about 0.3 s each: interpreter start and import); with threading.Event
#: about half hung, so 12 all passing by luck is a 1 in 2000 chance.
CHILDREN = 12


def test_sigint_always_stops_the_trace_commands_wait_loop():
    rng = random.Random(12)
    hung = []
    for i in range(CHILDREN):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, SRC], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.001, 0.02))    # land anywhere in the loop
            child.send_signal(signal.SIGINT)
            try:
                out, _ = child.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                hung.append(i)
                continue
            assert child.returncode == 0 and out.strip() == "stopped"
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not hung, f"children {hung} never returned from SIGINT"


def test_wait_returns_at_set_or_timeout_and_stays_set():
    with SignalSafeEvent() as event:
        assert not event.is_set() and event.wait(0) is False
        assert event.wait(0.01) is False
        setter = threading.Thread(target=event.set)
        setter.start()
        assert event.wait(30) is True       # woken by the set(), not by the 30 s
        setter.join()
        assert event.is_set() and event.wait(0) and event.wait(None)
        event.set()                         # idempotent
        assert event.wait(0)


def test_set_after_close_is_harmless():
    event = SignalSafeEvent()
    event.close()
    event.set()                             # a late signal: no write to a reused fd number
    assert event.is_set() and event.wait(0)
