"""One run per run dir: a lock file, `<run dir>/.dtlab.lock`, that a second `dtlab.train` in
the same dir (a copy of the command started twice, a resume while the run still lives) refuses
in one line naming the process that holds it. Free of Lightning: it is taken before Hydra
writes into the dir (dtlab.cli.CheckOutputDir) and again, re-entrantly, by `train()` itself.

A lock left by a run that was killed (SIGKILL, a node that went down) is stale: its process is
no longer alive on this host (or a new process has its pid, told by the start time), and the
next run takes it over with a log line. A lock from another host cannot be checked from here,
so it is refused with the line to remove it by hand.

The file is made with O_EXCL, which is atomic on local filesystems and on NFSv3+; a takeover
first renames the stale file away, so of two runs that find it stale only one wins.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from dtlab import DTLabError

log = logging.getLogger(__name__)
LOCK_NAME = ".dtlab.lock"
_held: dict[Path, int] = {}  # lock files this process holds, with how many acquire() calls hold each


def process_rank() -> int:
    """This process's DDP rank as torchrun or SLURM set it (0 when neither did)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "0").isdigit() and int(os.environ.get(key, "0")) > 0:
            return int(os.environ[key])
    return 0


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return start is None or _start_time(pid) in (None, start)


def _owner() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}: {owner.get('command')!r}"


def acquire(run_dir: str | Path) -> Path:
    """Take the run dir's lock (again, if this process holds it already), or DTLabError naming
    the live process that holds it."""
    path = (Path(run_dir) / LOCK_NAME).resolve()
    if process_rank() > 0:  # a DDP job's other ranks (torchrun, SLURM) run in rank 0's dir, under its lock
        return path
    if path in _held:
        _held[path] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a takeover can race another run's; a few tries settle it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_or_clear(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
        _held[path] = 1
        return path
    raise DTLabError(f"run dir {path.parent} is being locked by other runs just now: choose another hydra.run.dir")


def _refuse_or_clear(path: Path) -> None:
    try:
        owner = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return  # released meanwhile: try again
    except (OSError, ValueError):
        owner = {}  # half-written by a run killed as it took the lock
    pid, host = owner.get("pid"), owner.get("host")
    if host not in (None, socket.gethostname()):
        raise DTLabError(
            f"run dir {path.parent} is in use by {_describe(owner)}: wait for it to finish or choose another "
            f"hydra.run.dir; if that run is dead, delete {path}"
        )
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid, owner.get("start")):
        raise DTLabError(
            f"run dir {path.parent} is in use by {_describe(owner)}: wait for it to finish (or stop it), or choose "
            "another hydra.run.dir"
        )
    stale = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.rename(path, stale)  # atomic: of two runs that found it stale, one renames it
    except FileNotFoundError:
        return
    stale.unlink(missing_ok=True)
    log.warning("run dir %s: taking over the lock of %s, which is no longer running", path.parent, _describe(owner))


def release(path: Path) -> None:
    """Undo one acquire(); the file goes with the last."""
    if path not in _held:
        return
    _held[path] -= 1
    if _held[path] == 0:
        del _held[path]
        path.unlink(missing_ok=True)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        _held[path] = 1
        release(path)
