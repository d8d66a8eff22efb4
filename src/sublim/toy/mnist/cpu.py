"""CPU heuristics: how busy the machine is now, and how many torch threads to use."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def _cpu_times(path: str = "/proc/stat") -> tuple[int, int]:
    """(total, idle) clock ticks of all CPUs so far, from the first line of ``/proc/stat``; idle includes
    iowait, and total includes steal (time the hypervisor gave to someone else)."""
    with open(path, encoding="ascii") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks), ticks[3] + ticks[4]


def busy_cores(interval: float = 0.25, read: Callable[[], tuple[int, int]] = _cpu_times) -> float | None:
    """How many cores other work keeps busy right now: the non-idle share of all CPUs over ``interval``
    seconds, in cores (this process sleeps meanwhile). None where ``/proc/stat`` is not available."""
    try:
        total0, idle0 = read()
        time.sleep(interval)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    if total <= 0:
        return None
    return (1 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def auto_threads(busy: float | None = None) -> int:
    """1 thread when other work keeps at least half a core busy, else torch's current setting.

    On a shared 2-core machine, two OpenMP threads competing with other processes were 1.5-3x slower per
    step than one thread (barrier waits); on an idle machine two threads are faster. Busy is measured
    over a quarter second (:func:`busy_cores`), not from the 1-minute load average: that average stays
    at 0.5-1.0 for a minute after a run ends, which sent a second run in a row down the 1-thread path on
    an idle machine. Without ``/proc/stat`` it falls back to the load average (>= 0.5 is busy)."""
    if busy is None:
        busy = busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
    return 1 if busy >= 0.5 else torch.get_num_threads()
