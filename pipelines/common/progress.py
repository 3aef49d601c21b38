"""Progress of long loops: a tqdm bar on a terminal, plain lines anywhere else.

A bar redrawn into a log (a Prefect flow run, CI, `dvc repro > log`) becomes one line per redraw; there a
stage prints a line each time another 10 % is done instead, once the loop has run for QUIET_S (a loop that
ends sooner prints nothing: its stage's summary line says what it did), with the throughput and an ETA:

    train 40% (480 of 1,200 steps, 2m10s; 3.7 steps/s, ETA 3m15s)

flows/repro.py reads these lines (LINE) into the flow run's progress artifact. model/ reports progress through
a callback and knows nothing of either (`progress_bar`).

    >>> for entry in track(entries, "clean: read", "file"): ...
    >>> with reporter(total_bytes, "tokenize", "B", unit_scale=True) as progress: progress.update(n)
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm import tqdm

EVERY = 10  # percent between two lines
QUIET_S = 5.0  # no lines before a loop has run this long
# "<desc> <percent>% (<done> of <total> <unit>, <elapsed>; <rate>, ETA <eta>)", as ProgressLines prints it
LINE = re.compile(
    r"^(?P<desc>\S.*?) (?P<percent>\d{1,3})% \((?P<count>[^()]* of [^();]*), (?P<elapsed>[^();,]+)"
    r"(?:; (?P<rate>[^();,]+), ETA (?P<eta>[^();]+))?\)$"
)

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether progress is drawn (stderr is a terminal) or written as lines."""
    return sys.stderr.isatty()


def _plural(unit: str, n: float) -> str:
    if n == 1 or len(unit) <= 2 or unit.endswith("s"):  # B, it, MB; steps
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s" if m else f"{s} s"


class ProgressLines:
    """tqdm's `update`/`close` for a log: one line on stderr each time another `every` percent is done, none
    before `quiet_s` have passed since the start (the first line then says how far it is)."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        unit_scale: bool = False,
        every: int = EVERY,
        quiet_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.every, self.clock = every, clock
        self.quiet_s = QUIET_S if quiet_s is None else quiet_s
        self.n = self.initial = initial
        self.started = clock()
        self.shown = self._tick()  # a resumed loop prints from the next multiple of `every` on

    def _tick(self) -> int:
        """How many `every`-percent marks are passed."""
        return int(self.percent // self.every)

    @property
    def percent(self) -> float:
        return 100.0 * min(self.n, self.total) / self.total if self.total else 100.0

    def _count(self, n: float) -> str:
        return tqdm.format_sizeof(n) if self.unit_scale else f"{n:,}"

    def update(self, n: int = 1) -> None:
        self.n += n
        tick = self._tick()
        elapsed = self.clock() - self.started
        if tick > self.shown and elapsed >= self.quiet_s:
            self.shown = tick
            unit = _plural(self.unit, self.total)
            count = f"{self._count(self.n)} of {self._count(self.total)} {unit}"
            speed = ""
            if elapsed > 0 and self.n > self.initial:
                rate = (self.n - self.initial) / elapsed
                per_s = f"{tqdm.format_sizeof(rate)}{self.unit}/s" if self.unit_scale else f"{rate:.3g} {unit}/s"
                speed = f"; {per_s}, ETA {_duration(max(self.total - self.n, 0) / rate)}"
            line = f"{self.desc} {self.percent:.0f}% ({count}, {_duration(elapsed)}{speed})"
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to clear (tqdm's interface)."""

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reporter(total: int, desc: str, unit: str = "it", *, initial: int = 0, unit_scale: bool = False):
    """A tqdm bar on a terminal, ProgressLines elsewhere: `update(n)`, `close()`, a context manager."""
    if on_terminal():
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, file=sys.stderr)
    return ProgressLines(total, desc, unit, initial=initial, unit_scale=unit_scale)


def track(items: Sequence[T], desc: str, unit: str = "it") -> Iterator[T]:
    """The items, with their progress shown as `reporter` shows it."""
    with reporter(len(items), desc, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def progress_bar(desc: str | None, unit: str = "batch") -> Callable[[int, int], None] | None:
    """A progress(done, total) callback that shows a `reporter` and closes it at the end; None (nothing shown)
    when desc is None."""
    if desc is None:
        return None
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = reporter(total, desc, unit)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
