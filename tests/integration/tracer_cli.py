"""Running `sni-proxy trace ...` for real in the tracer tests: start it, wait until it says it
is attached (its first stderr line), stop it with Ctrl-C, and check every JSON object it
printed against the field table of docs/tracing.md."""
from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import threading
from functools import lru_cache
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
SNI_PROXY = str(REPO / ".venv" / "bin" / "sni-proxy")
#: Longest a command may take to load and attach its programs on a loaded 2-CPU machine.
ATTACH_TIMEOUT_S = 30


class TraceCli:
    """One `sni-proxy trace` process; `stop()` returns (rc, stdout, stderr)."""

    def __init__(self, *argv: str, ready: str = "Tracing") -> None:
        self.argv = ["trace", *argv]
        self.proc = subprocess.Popen([SNI_PROXY, *self.argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._err: queue.Queue = queue.Queue()
        self._err_lines: list[str] = []
        self._out_lines: list[str] = []
        self._out_changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._readers:
            t.start()
        try:
            line = self._err.get(timeout=ATTACH_TIMEOUT_S)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"{self.argv}: not attached after {ATTACH_TIMEOUT_S} s")
        if line is None or ready not in line:
            rc, out, err = self.stop()
            raise AssertionError(f"{self.argv}: expected {ready!r} first, got rc={rc}\n{err}")

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self._err_lines.append(line)
            self._err.put(line)
        self._err.put(None)

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            with self._out_changed:
                self._out_lines.append(line)
                self._out_changed.notify_all()

    def wait_output(self, predicate: Callable[[str], bool], timeout: float = 20) -> str:
        """Until predicate(stdout so far) holds (woken by each line), or AssertionError."""
        with self._out_changed:
            if not self._out_changed.wait_for(lambda: predicate("".join(self._out_lines)),
                                              timeout=timeout):
                raise AssertionError(f"{self.argv}: output not as expected after {timeout} s:"
                                     f"\n{''.join(self._out_lines)}")
            return "".join(self._out_lines)

    def stop(self, timeout: float = 30) -> tuple[int, str, str]:
        """Ctrl-C (the commands print their last table, then exit 0)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> tuple[int, str, str]:
        """Until the command ends (by itself with -d, or after stop())."""
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=timeout)
        return rc, "".join(self._out_lines), "".join(self._err_lines)


@lru_cache(maxsize=1)
def documented_json_fields() -> dict[str, tuple[frozenset, frozenset]]:
    """type -> (fields always present, fields some flag adds), from docs/tracing.md."""
    text = (REPO / "docs" / "tracing.md").read_text()
    section = text.split("**JSON fields**", 1)[1].split("\n\n", 2)[1]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        kind = cells[0].strip("`")
        out[kind] = (frozenset(re.findall(r"`(\w+)`", cells[2])),
                     frozenset(re.findall(r"`(\w+)`", cells[3])))
    assert len(out) >= 7, out
    return out


def json_objects(out: str) -> list[dict]:
    """Every stdout line as JSON, each checked against the documented fields."""
    objs = [json.loads(line) for line in out.splitlines() if line.strip()]
    fields = documented_json_fields()
    for obj in objs:
        assert obj["type"] in fields, obj
        always, optional = fields[obj["type"]]
        keys = set(obj) - {"type"}
        assert always <= keys, (obj, "missing", always - keys)
        assert keys <= always | optional, (obj, "undocumented", keys - always - optional)
    return objs
