"""A deadline on every wait for other ranks, enforced from outside the process.

MLX's collectives have no timeout: a rank whose peer stopped answering (a Mac that went to sleep, a
pulled cable, a stopped process) waits forever. Worse, ``mx.distributed.init`` holds Python's GIL while
it waits for the others to connect (measured with MLX 0.32.4's ring backend), so no thread of the waiting
process could react. The watchdog is therefore a tiny separate process, run as a script with the
standard library only (it does not import MLX), that the generating process tells over a pipe when a
wait begins (its deadline and the line to print) and when it ends. When a deadline passes it prints that
one line on the shared stderr and kills the generating process with SIGKILL: a signal handler could not
run while the process is blocked inside MLX. No partial output can exist at that moment, since outputs
are written after the last exchange, atomically. The watchdog exits by itself when the pipe closes,
i.e. when the process it guards ends, however it ends.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time


class Watchdog:
    """The parent's side: ``arm(seconds, line)`` before a wait, ``disarm()`` after it."""

    def __init__(self) -> None:
        try:
            err = sys.stderr.fileno()  # where this process's own errors go (the CLI may have moved it)
        except (AttributeError, OSError, ValueError):
            err = 2
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            close_fds=True,
        )

    def arm(self, seconds: float, line: str) -> None:
        """Kill this process, printing ``error: <line>``, unless :meth:`disarm` comes within ``seconds``."""
        self._send(f"{max(seconds, 0.001):.3f} {' '.join(line.split())}")

    def disarm(self) -> None:
        self._send("0")

    def close(self) -> None:
        """Stop the watchdog (it also stops on its own when this process ends)."""
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait()

    def _send(self, message: str) -> None:
        self._proc.stdin.write(message.encode() + b"\n")
        self._proc.stdin.flush()


def _watch(parent: int) -> None:
    """The watchdog process: wait for deadlines on stdin; on expiry print the line and kill ``parent``."""
    deadline: float | None = None
    line = ""
    pending = b""
    while True:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([0], [], [], timeout)
        if readable:
            chunk = os.read(0, 65536)
            if not chunk:  # the parent closed the pipe or ended
                return
            pending += chunk
            while b"\n" in pending:
                message, pending = pending.split(b"\n", 1)
                seconds, _, text = message.decode().partition(" ")
                deadline = time.monotonic() + float(seconds) if float(seconds) > 0 else None
                line = text
        elif deadline is not None and time.monotonic() >= deadline:
            lead = "\n" if os.isatty(2) else ""  # end a progress bar's line on a terminal
            os.write(2, f"{lead}error: {line}\n".encode())
            os.kill(parent, signal.SIGKILL)
            return


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
