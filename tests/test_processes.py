"""fedapp.ops.processes on real child processes: tree and group lookup, start time, liveness, stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from fedapp.ops.processes import (
    descendant_groups,
    group_alive,
    pid_reused,
    process_table,
    start_time,
    stop_group,
    stop_process_group,
)

# A child in a group of its own that starts a grandchild in a session (and group) of its own, as
# the SuperLink starts Flower's SuperExec; it prints the grandchild's PID.
TREE = (
    "import subprocess, sys\n"
    "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
    "p.wait()\n"
)


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen]]:
    """Children started by a test; whatever is left of them is killed afterwards."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sleeper(spawned: list[subprocess.Popen], *cmd: str) -> subprocess.Popen:
    proc = subprocess.Popen(list(cmd) or ["sleep", "60"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    spawned.append(proc)
    return proc


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_process_table_has_parent_and_group(spawned):
    proc = sleeper(spawned)
    table = process_table()
    assert table[proc.pid] == (os.getpid(), proc.pid)  # start_new_session: its own group
    assert table[os.getpid()] == (os.getppid(), os.getpgrp())


def test_descendant_groups_follow_children_into_their_own_sessions(spawned):
    tree = sleeper(spawned, sys.executable, "-c", TREE)
    grandchild = int(tree.stdout.readline())
    try:
        assert wait_until(lambda: process_table().get(grandchild, (0, 0))[1] == grandchild)
        assert descendant_groups(tree.pid) == {tree.pid, grandchild}
        assert descendant_groups(grandchild) == {grandchild}  # not upwards
    finally:
        if group_alive(grandchild):
            os.killpg(grandchild, signal.SIGKILL)


def test_group_alive_counts_a_zombie_until_it_is_reaped(spawned):
    proc = sleeper(spawned, "true")
    assert wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
    assert group_alive(proc.pid)
    proc.wait()
    assert not group_alive(proc.pid)


def test_start_time_tells_a_process_from_a_later_one_with_its_pid(spawned):
    proc = sleeper(spawned)
    started = start_time(proc.pid)
    since_boot = time.time() - psutil.boot_time()
    assert started is not None and since_boot - 10 < started <= since_boot + 1
    assert start_time(proc.pid) == started  # stable: the same process reads the same
    assert not pid_reused(proc.pid, started)
    assert not pid_reused(proc.pid, None)  # nothing recorded: trust the pid
    assert pid_reused(proc.pid, started - 3600)  # recorded for a process an hour older: another one
    stop_process_group(proc, grace=5)
    assert start_time(proc.pid) is None and not pid_reused(proc.pid, started)


def test_stop_group_stops_the_tree_with_sigterm(spawned):
    tree = sleeper(spawned, sys.executable, "-c", TREE)
    grandchild = int(tree.stdout.readline())
    assert wait_until(lambda: process_table().get(grandchild, (0, 0))[1] == grandchild)
    stop_group(tree.pid, grace=5, proc=tree)
    assert tree.returncode == -signal.SIGTERM  # collected through proc
    assert not group_alive(tree.pid) and not group_alive(grandchild)


def test_stop_group_escalates_to_sigkill_after_the_grace_period(spawned):
    # SIG_IGN survives exec: the whole group ignores SIGTERM.
    stubborn = sleeper(spawned, "sh", "-c", "trap '' TERM; sleep 60 & echo ready; wait")
    assert stubborn.stdout.readline().strip() == "ready"
    began = time.monotonic()
    stop_process_group(stubborn, grace=0.5)
    assert time.monotonic() - began >= 0.5
    assert stubborn.returncode == -signal.SIGKILL and not group_alive(stubborn.pid)


def test_grace_zero_kills_at_once_and_a_stopped_group_is_a_no_op(spawned):
    proc = sleeper(spawned)
    stop_group(proc.pid, grace=0, proc=proc)
    assert proc.returncode == -signal.SIGKILL
    stop_group(proc.pid, grace=5)  # gone already: nothing to signal, returns at once
    stop_process_group(proc)


def test_stop_group_reaps_a_child_it_was_not_given(spawned):
    """A group read back from a state file (no Popen object): our exited child is reaped by pid."""
    proc = sleeper(spawned)
    stop_group(proc.pid, grace=5)
    assert not group_alive(proc.pid)
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)  # already collected by stop_group
    proc.returncode = -signal.SIGTERM  # tell Popen, which could not collect it itself


def test_the_watchdog_stops_the_groups_still_guarded_at_end_of_file(spawned):
    """fedapp.ops.watchdog on these helpers: ``+PGID`` guards a group, ``-PGID`` releases it."""
    import io

    from fedapp.ops.watchdog import guard

    kept, released = sleeper(spawned), sleeper(spawned)
    commands = io.BytesIO(f"+{kept.pid}\n+{released.pid}\nnoise\n-{released.pid}\n".encode())
    assert guard(commands, grace=5) == {kept.pid}
    assert not group_alive(kept.pid) and released.poll() is None
    kept.returncode = -signal.SIGTERM  # collected by the watchdog's stop_group, not by Popen
