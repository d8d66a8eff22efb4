"""Progress for every long stage: a tqdm bar on a terminal, interval-limited one-line records in a log.

Every ``progress: bool | None`` parameter in sublim means the same: None = auto (stderr is a terminal: a
bar; otherwise lines), True = a bar, False = silent. Off a terminal a stage writes one line to stderr at
most every ``SUBLIM_PROGRESS_INTERVAL`` seconds (default 30; the first after one interval), and a final
line when it closes if it wrote any or ran for at least one interval, so a short stage prints nothing and
a six-minute one about a dozen lines::

    [pretrain organism] 1200/6000 steps (20%), 00:41 elapsed, ~02:44 left, loss=2.31

Both modes are tqdm (the line mode overrides only ``display``, tqdm's documented extension point, and
keeps its counting, timing, rate and ETA). Third-party bars (transformers' "Loading weights", "Writing
model shards", hub downloads) follow the same switch through :func:`silence_library_bars`, which the CLI
calls once at start-up.
"""
from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterable
from typing import Any, Literal

from tqdm.std import tqdm as _tqdm

DEFAULT_INTERVAL = 30.0
ENV_INTERVAL = "SUBLIM_PROGRESS_INTERVAL"
HF_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's switch; transformers reads it at import
_TRUE = {"1", "ON", "YES", "TRUE"}
Mode = Literal["bar", "lines", "off"]


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def mode(progress: bool | None = None) -> Mode:
    """What a ``progress`` argument means here and now: 'bar', 'lines' or 'off'."""
    if progress is False:
        return "off"
    if progress is True or _isatty(sys.stderr):
        return "bar"
    return "lines"


def interval() -> float:
    """Seconds between two progress lines: ``SUBLIM_PROGRESS_INTERVAL`` or 30 (a bad value warns and is
    ignored: a typo in a logging knob must not stop a run)."""
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        return max(0.0, float(raw))
    except ValueError:
        warnings.warn(f"{ENV_INTERVAL}={raw!r} is not a number of seconds; using {DEFAULT_INTERVAL:g}",
                      stacklevel=2)
        return DEFAULT_INTERVAL


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class LineProgress(_tqdm):
    """tqdm that writes whole lines (no carriage returns, no bar) at most once per ``mininterval`` and
    first after ``delay`` (both set to :func:`interval` by :func:`progress_bar`), plus a final line."""

    monitor_interval = 0  # no monitor thread: lines are written only from update() and close()
    LINE = "[{desc}] {n_fmt}/{total_fmt} {units} ({percentage:.0f}%), {elapsed} elapsed, ~{remaining} left{postfix}"
    FINAL = "[{desc}] {n_fmt}/{total_fmt} {units} ({percentage:.0f}%) in {elapsed}{postfix}"
    COUNT = "[{desc}] {n_fmt} {units}, {elapsed} elapsed{postfix}"  # no total known
    COUNT_FINAL = "[{desc}] {n_fmt} {units} in {elapsed}{postfix}"
    printed = 0  # lines written so far (class defaults: display() may run inside tqdm's __init__)
    closing = False

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its bar: nothing to clear in a log (False: no carriage return either)
            return False
        if msg is None:
            if self.total:
                fmt = self.FINAL if self.closing else self.LINE
            else:
                fmt = self.COUNT_FINAL if self.closing else self.COUNT
            self.bar_format = fmt.replace("{units}", _plural(self.unit))
            msg = str(self)
        self.fp.write(msg + "\n")
        self.fp.flush()
        self.printed += 1
        return True

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # a postfix never forces a line

    def set_postfix_str(self, s: str = "", refresh: bool = False) -> None:
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc: str | None = None, refresh: bool = False) -> None:
        super().set_description(desc, refresh=False)

    def close(self) -> None:
        if self.disable:
            return
        if self.printed or self._time() - self.start_t >= self.delay:
            self.closing = True
            self.display()
        self.leave = False  # tqdm's own close only "clears" now, which display() ignores
        super().close()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "step", initial: int = 0, progress: bool | None = None, leave: bool = False) -> Any:
    """A tqdm-like reporter for one stage: use it as tqdm (``update(n)``, ``set_postfix``, ``close``, a
    context manager, or iterate ``iterable``). ``unit`` is a singular noun ("step", "row"); ``progress``
    as everywhere in sublim (None auto, True bar, False silent)."""
    m = mode(progress)
    if m == "off":
        return _tqdm(iterable, total=total, desc=desc, initial=initial, disable=True)
    if m == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave)
    every = interval()
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, mininterval=every,
                        delay=every, miniters=1, smoothing=0, leave=False)


def silence_library_bars() -> None:
    """Off a terminal, turn off huggingface_hub's and transformers' own tqdm bars ("Loading weights",
    "Writing model shards", downloads): the same switch as sublim's. Idempotent and cheap (imports
    neither package: one not yet imported reads ``HF_HUB_DISABLE_PROGRESS_BARS``, which child processes
    inherit too). ``HF_HUB_DISABLE_PROGRESS_BARS=0`` in the environment keeps them."""
    if mode() == "bar":
        return
    if os.environ.setdefault(HF_ENV, "1").strip().upper() not in _TRUE:
        return
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
