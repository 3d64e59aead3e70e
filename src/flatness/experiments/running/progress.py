"""Progress display of the pipeline: a tqdm bar on a terminal, plain periodic lines otherwise.

A bar redraws itself with carriage returns, which a log file keeps (hundreds of KB per run),
and a bar that clears itself leaves no newline, so the next output runs into its line; when
stderr is not a terminal, :func:`progress_bar` returns a :class:`LineProgress` instead, which
writes one ordinary line at most every ``interval`` seconds (:data:`LINE_INTERVAL`). All
offer ``update``, ``set_postfix``, ``write`` (a message on the progress stream that leaves the
bar intact) and ``close``; with ``enabled=False`` they do nothing but ``write``. Every progress
display of the pipeline and the CLI comes from here.

Example:
    >>> import io
    >>> out = io.StringIO()  # not a terminal: plain lines
    >>> bar = progress_bar(650, "fa_lam0.01_seed0", "step", stream=out)
    >>> for _ in range(650):
    ...     bar.update(1)
    >>> bar.set_postfix(epoch=50, test_acc="0.9561")
    >>> bar.close()
    >>> print(out.getvalue(), end="")  # doctest: +ELLIPSIS
    fa_lam0.01_seed0: 650/650 steps (100 %, ... s) epoch=50 test_acc=0.9561
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

__all__ = ["LINE_INTERVAL", "LineProgress", "progress_bar", "tracked"]

LINE_INTERVAL = 30.0  # seconds between two plain progress lines


class LineProgress:
    """Counts like a tqdm bar; prints ``DESC: N/TOTAL UNITs (P %, T s) key=value`` lines."""

    def __init__(
        self, total: int, description: str, unit: str, *, stream: TextIO, interval: float, leave: bool
    ) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.stream, self.interval, self.leave = stream, interval, leave
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.shown: tuple[int, str] | None = None  # count and postfix of the last line written

    def _line(self) -> str:
        share = f"{100 * self.n / self.total:.0f} %, " if self.total else ""
        elapsed = time.monotonic() - self.start
        text = f"{self.description}: {self.n}/{self.total} {self.unit}s ({share}{elapsed:.0f} s)"
        return text + (f" {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        """Count ``n`` more; print a line if ``interval`` seconds passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._show()

    def set_postfix(self, **values: Any) -> None:
        """The ``key=value`` text at the end of the next lines."""
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        """Print ``message`` on a line of its own."""
        print(message, file=self.stream, flush=True)

    def _show(self) -> None:
        self.shown = (self.n, self.postfix)
        self.write(self._line())

    def close(self) -> None:
        """Print the final count if ``leave`` and it has not been shown."""
        if self.leave and self.shown != (self.n, self.postfix):
            self._show()


class _Silent(LineProgress):
    """No progress shown; ``write`` still prints."""

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        return None


def progress_bar(
    total: int,
    description: str,
    unit: str,
    *,
    leave: bool = True,
    stream: TextIO | None = None,
    interval: float | None = None,
    enabled: bool = True,
) -> Any:
    """A tqdm bar on ``stream`` (default stderr) if it is a terminal, else a :class:`LineProgress`.

    The :class:`LineProgress` writes a line every ``interval`` seconds (default
    :data:`LINE_INTERVAL`); nothing but ``write`` unless ``enabled``.
    """
    stream = sys.stderr if stream is None else stream
    interval = LINE_INTERVAL if interval is None else interval
    if not enabled:
        return _Silent(total, description, unit, stream=stream, interval=interval, leave=False)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=description, unit=unit, leave=leave, file=stream)
        # tqdm.write prints to stdout unless told: messages go where the bar is
        bar.write = lambda message: tqdm.write(message, file=stream)  # type: ignore[method-assign]
        return bar
    return LineProgress(total, description, unit, stream=stream, interval=interval, leave=leave)


def tracked(items: Iterable[T], bar: Any) -> Iterator[T]:
    """``items`` one by one, each counted on ``bar`` once its turn is over.

    The bar is closed at the end, also when the loop stops early or raises.
    """
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
