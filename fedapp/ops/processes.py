"""Process queries and stopping, on psutil: process trees and groups, start times, liveness.

The launchers run each Flower process in a process group of its own and stop it by group
(SIGTERM, then SIGKILL after a grace period), together with the groups of its descendants:
Flower's SuperLink starts SuperExec and the ServerApp in sessions of their own. A PID recorded in
a state file is checked against the process's start time before it is signalled, so that a PID
the kernel has since given to another process is never stopped.

psutil answers the per-process questions (parent, start time, existence); process groups are
POSIX's, so group membership comes from ``os.getpgid`` and group signals from ``os.killpg``.
``exit_on_sigterm`` is the launchers' SIGTERM handler, so that a stopped launcher stops its groups.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

# psutil's start time is boot time (whole seconds, moved when the clock is set) plus ticks since
# boot; the two are read separately, so one process's value may differ by a second between reads.
START_TIME_TOLERANCE = 1.0


def process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (parent pid, process group)}`` of every process this user may see."""
    table = {}
    for proc in psutil.process_iter(["ppid"]):
        try:
            table[proc.pid] = (int(proc.info["ppid"]), os.getpgid(proc.pid))
        except (OSError, TypeError):  # gone meanwhile, or its parent not readable
            continue
    return table


def descendant_groups(pgid: int) -> set[int]:
    """Process groups of every descendant of group ``pgid``'s processes, ``pgid`` included.

    The SuperLink starts Flower's SuperExec (which starts the ServerApp) in a session of its own,
    so stopping the SuperLink's group alone would leave them to notice on their own.
    """
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    todo = [pid for pid, (_, group) in table.items() if group == pgid]
    groups, seen = {pgid}, set(todo)
    while todo:
        for pid in children.get(todo.pop(), []):
            if pid not in seen:
                seen.add(pid)
                groups.add(table[pid][1])
                todo.append(pid)
    return groups


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists (an unreaped zombie counts)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours


def start_time(pid: int) -> float | None:
    """Seconds from boot to the start of process ``pid`` (None if there is no such process).

    Recorded beside a PID to tell that process from a later one given the same PID. Counted from
    boot, not the epoch, so that setting the clock does not make a live process look replaced.
    """
    try:
        return round(psutil.Process(pid).create_time() - psutil.boot_time(), 2)
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):  # ValueError: a negative pid
        return None


def pid_reused(pid: int, recorded_start: float | None) -> bool:
    """Whether ``pid`` now names another process than the one that had started at ``recorded_start``
    (:func:`start_time`). False when nothing was recorded or no process has that PID now."""
    if recorded_start is None:
        return False
    started = start_time(pid)
    return started is not None and abs(started - float(recorded_start)) > START_TIME_TOLERANCE


def stop_group(pgid: int, grace: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM process group ``pgid`` and its descendants' groups, SIGKILL what is left after ``grace`` s
    (``grace`` 0: SIGKILL at once).

    Works on any process group (e.g. PIDs read back from a state file); pass ``proc`` when it is
    our child so that its exit status is collected by it.
    """
    groups = descendant_groups(pgid)

    def reap() -> None:
        # An exited child of ours stays a zombie (its group "alive") until it is waited for.
        if proc is not None:
            proc.poll()
            return
        try:
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass

    def wait_gone(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            reap()
            if not any(group_alive(g) for g in groups):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    steps = [(signal.SIGTERM, grace)] if grace > 0 else []  # grace 0: SIGKILL at once, like a crash
    # The group asked for first, then its descendants': a parent signalled after its child died could
    # see the child go and exit on its own first (a race the test of this function lost under load).
    order = [pgid, *sorted(groups - {pgid})]
    for sig, timeout in [*steps, (signal.SIGKILL, 10.0)]:
        for group in order:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if wait_gone(timeout):
            return


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM our child's whole process group, SIGKILL what is left after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    stop_group(proc.pid, grace, proc)
    proc.wait()


def exit_on_sigterm(signum: int, frame: object) -> None:
    """The launchers' SIGTERM handler: SystemExit, so that `finally` blocks stop what they started."""
    raise SystemExit(128 + signum)
