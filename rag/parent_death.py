"""Worker processes end with the process that started them, however it died (kill -9 included).

A spawned pool worker waits on its task queue, whose write end it holds itself, so a dead parent never reaches
it as end-of-file: left alone it lives on, re-parented, and keeps the multiprocessing resource tracker alive
through the tracker pipe it inherited (the tracker exits once every write end of that pipe is closed)."""

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """Call first in a worker process started by `parent_pid`: the worker ends as soon as that process dies.

    On Linux the kernel sends SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG; it fires when the thread
    that started the worker ends, so the worker must be started by a thread that outlives it). Everywhere, a
    daemon thread also polls the parent pid, and a parent that died before this call is caught at once."""
    if sys.platform.startswith("linux"):
        _kill_on_parent_death()
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watch", daemon=True).start()


def _kill_on_parent_death() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    # a failure (a seccomp filter, say) leaves the watcher thread to do the job
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # an orphan is re-parented to init or a subreaper
        time.sleep(PARENT_POLL_S)
    os._exit(1)
