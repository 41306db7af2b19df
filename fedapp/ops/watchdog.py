"""Stops a launcher's Flower processes when the launcher dies, however it dies (``kill -9`` too).

The launcher starts this process with a pipe on its standard input and keeps the write end. It
writes ``+PGID`` for each process group it starts and ``-PGID`` for each it stopped itself. The
kernel closes the pipe when the launcher exits, for any reason; at that end of file the watchdog
stops every group still listed, with its descendants (Flower's SuperExec and ServerApp run in
sessions of their own under the SuperLink). Without it, a killed launcher left its SuperLink and
ServerApp running, writing into the results folder with no one to judge the run.

    python -m fedapp.ops.watchdog   # started by fedapp.ops.launch, not by hand
"""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import IO

from fedapp.ops.processes import stop_group


def guard(commands: IO[bytes], grace: float = 10.0) -> set[int]:
    """Read ``+PGID`` / ``-PGID`` lines until end of file, then stop the groups still guarded."""
    groups: set[int] = set()
    for line in commands:
        text = line.decode(errors="replace").strip()
        if len(text) > 1 and text[0] in "+-" and text[1:].isdigit():
            (groups.add if text[0] == "+" else groups.discard)(int(text[1:]))
    for group in sorted(groups):
        stop_group(group, grace)
    return groups


class Watchdog:
    """The launcher's end of the watchdog: ``guard(proc)`` after starting a process group,
    ``release(proc)`` after stopping it."""

    def __init__(self) -> None:
        # Its own session: a Ctrl-C to the terminal's group must not stop it before the launcher.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedapp.ops.watchdog"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def guard(self, proc: subprocess.Popen) -> None:
        self._send(f"+{proc.pid}")

    def release(self, proc: subprocess.Popen) -> None:
        self._send(f"-{proc.pid}")

    def close(self) -> None:
        """Normal exit: everything was stopped already; the watchdog sees end of file and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only end of file on stdin ends it
    guard(sys.stdin.buffer)
