"""Progress bars for long loops whose code knows nothing of tqdm (model/ reports progress through a callback)."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm


def progress_bar(desc: str | None, unit: str = "batch") -> Callable[[int, int], None] | None:
    """A progress(done, total) callback that draws a tqdm bar and closes it at the end; None (no bar) when desc
    is None."""
    if desc is None:
        return None
    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, mininterval=2)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress
