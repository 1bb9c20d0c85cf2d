"""An Event a signal handler may set: what `sni-proxy trace` and `sni-proxy profile` wait on
until Ctrl-C / SIGTERM.

threading.Event will not do: Event.set() takes the Condition lock that Event.wait() holds
between its checks, and Python runs a signal handler in the main thread between two
bytecodes, possibly inside that wait. The handler then waits for a lock its own thread holds,
forever (the `signal` module's documentation warns against threading locks in handlers). A
loaded machine makes it likely: the main thread, preempted inside Event.wait(), gets the
signal when it runs again. Here set() is an attribute store and a byte written to a pipe;
wait() sleeps in select() on that pipe, which no lock guards.
"""
from __future__ import annotations

import os
import select
import time

#: Longest single sleep in wait(). Python runs a signal handler in the main thread only: if
#: the kernel delivered the signal to another thread (a tracer's ring reader), the main
#: thread's select() is not interrupted and the handler runs when select() returns. This
#: bounds that delay for wait(None) and long timeouts.
MAX_SLEEP_S = 0.5


class SignalSafeEvent:
    """set() / is_set() / wait(timeout) as threading.Event's, set() safe in a signal handler."""

    def __init__(self) -> None:
        self._flag = False
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        self._flag = True
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            # Full: a wake-up is there already. Closed: nobody waits any more.
            pass

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        """Until set() or `timeout` seconds (None: no limit); returns is_set().

        A set() between the flag check and select() left its byte in the pipe, so select()
        returns at once: no wake-up is lost. The byte stays (never drained): once set, every
        wait() returns at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._flag:
            left = MAX_SLEEP_S if deadline is None else deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([self._read_fd], [], [], min(left, MAX_SLEEP_S))
            except (OSError, ValueError):
                break       # closed under us: report what we know
        return self._flag

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> SignalSafeEvent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
