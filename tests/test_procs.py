"""The group reaper: a step's process tree dies with the process that started it, even when
that one is killed with SIGKILL (a Ray worker), and only the groups still registered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from scanflow.procs import group_pids, pid_alive
from support.waiting import wait_for

STARTER = textwrap.dedent('''
    import json, subprocess, sys, time
    from scanflow.procs import GroupReaper
    reaper = GroupReaper(grace=1.0)
    nap = "import time; time.sleep(60)"
    tree = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {nap!r}]); time.sleep(60)"
    kept = subprocess.Popen([sys.executable, "-c", tree], start_new_session=True)
    done = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    reaper.add(kept.pid)
    reaper.add(done.pid)
    reaper.remove(done.pid)  # a step that ended: its group is no longer the reaper's business
    print(json.dumps({"kept": kept.pid, "done": done.pid, "reaper": reaper.pid}), flush=True)
    time.sleep(60)
''')


def test_a_killed_starters_registered_process_groups_are_killed_by_its_reaper() -> None:
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    pids = json.loads(starter.stdout.readline())
    kept = wait_for(lambda: len(group_pids(pids["kept"])) == 2 and group_pids(pids["kept"]), timeout=20,
                    what="the registered step and its child running")
    try:
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
        wait_for(lambda: not any(pid_alive(p) for p in kept), timeout=15,
                 what="the registered group killed, grandchild included")
        wait_for(lambda: not pid_alive(pids["reaper"]), timeout=10, what="the reaper gone too")
        assert pid_alive(pids["done"])  # removed before: left alone
    finally:
        for pid in (*kept, pids["done"]):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
