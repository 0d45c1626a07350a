"""CPU time and memory of a serving process tree, from /proc (Linux).

"The serving process" is the one run.py started plus its descendants (a
``tollway serve`` with several workers, or the Redis it embeds), so that a
target cannot look cheap by doing its work in a child. Read around a
measured window; a descendant that exits inside the window takes its CPU
time with it, which is why the windows are short and nothing exits in them.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # the command name may hold spaces


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_us(pids: list[int]) -> float | None:
    """utime + stime so far, summed, in microseconds; None if the root is gone."""
    total = 0.0
    for i, pid in enumerate(pids):
        fields = _stat(pid)
        if fields is None:
            if i == 0:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) * _TICK_US
    return total


def reaped_us(pid: int) -> float:
    """What ``pid``'s children that exited and were waited for used (its
    cutime + cstime), in microseconds: with ``cpu_us(tree(pid))``, a server
    that forks a process per connection (Postgres) loses none of it to a
    connection that closed inside the window. 0 if it is gone."""
    fields = _stat(pid)
    return 0.0 if fields is None else (int(fields[13]) + int(fields[14])) * _TICK_US


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


class PeakRss:
    """Samples the tree's summed RSS every ``every`` seconds in a thread,
    between ``start()`` and ``stop()``, which returns the peak in bytes
    (``peak_root``: the root process's own peak)."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.peak = self.peak_root = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids, n = tree(self.pid), 0
        while not self._done.is_set():
            if n % 20 == 0:  # children may come and go; a /proc scan is ~ms
                pids = tree(self.pid)
            self.peak = max(self.peak, rss_bytes(pids))
            self.peak_root = max(self.peak_root, rss_bytes([self.pid]))
            n += 1
            self._done.wait(self.every)

    def start(self) -> PeakRss:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._done.set()
        self._thread.join(timeout=5)
        return self.peak


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (children
    inherit it): 1,000 streams through a proxy need ~2,000 descriptors there
    and ~1,000 in the client and the fake. Returns the soft limit now set."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return int(soft)
