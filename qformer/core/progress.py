"""Progress of a long step: a bar with rate and time left on a terminal, plain log lines in a job log.

One rule decides, the one Ray Data uses for its own progress output: when stdout is a terminal (and the
bar's stream, stderr, is one too) a tqdm bar is drawn; otherwise (`ray job logs`, CI, a file) a line
"<desc>: 120/2000 images (6%), 35.2 images/s, 0:00:53 left" is logged every `log_every_s` seconds,
and one line when the step ends (not after a failure). A bar nobody sees (`enabled=False`: ranks other
than 0) does nothing.

The training loop, evaluation (encoding, ITM re-ranking), `qformer data check` and `cache-features`
all report through `Progress`, so they look alike and follow the same rule.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm

from qformer.core.logs import get_logger

DEFAULT_LOG_EVERY_S = float(os.environ.get("QFORMER_PROGRESS_EVERY_S", "30"))

_log = get_logger(__name__)  # qformer.core.progress


def is_interactive(stream: IO[str] | None = None) -> bool:
    """True when stdout is a terminal and so is `stream` (where a bar would be drawn; default stderr)."""
    stream = sys.stderr if stream is None else stream
    return _isatty(sys.stdout) and _isatty(stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _size(stream: Any) -> tuple[int, int]:
    try:
        return tuple(os.get_terminal_size(stream.fileno()))
    except (AttributeError, OSError, ValueError):
        return (0, 0)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """`update(n)` as work completes; `close()` (or a `with` block) at the end.

    total: units expected (None: unknown, no percentage or time left). interactive: force the bar (True)
    or the log lines (False); None decides with `is_interactive(stream)`. log_every_s: seconds between
    plain lines (None: no periodic lines, e.g. where the caller logs its own; 0: a line per update).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0, enabled: bool = True,
                 interactive: bool | None = None, stream: IO[str] | None = None,
                 log_every_s: float | None = DEFAULT_LOG_EVERY_S, logger: logging.Logger | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = int(initial)
        self.enabled = enabled
        self.log_every_s = log_every_s
        self.log = logger or _log
        self.start = self.last_line = time.monotonic()
        self.closed = False
        self.bar = None
        if enabled and (is_interactive(stream) if interactive is None else interactive):
            stream = stream or sys.stderr
            # a terminal that reports no size (0x0: `script`, some containers) would get no bar at all
            sized = min(_size(stream)) > 0
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=f" {unit}", file=stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                            mininterval=0.5)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    def update(self, n: int = 1) -> None:
        if not self.enabled or self.closed:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.log_every_s is not None and now - self.last_line >= self.log_every_s:
            self.last_line = now
            self.log.info("%s", self.line(now))

    def set_total(self, total: int | None, desc: str | None = None) -> None:
        """A better estimate of the total (and a new description) once some of the work has shown its size."""
        self.total, self.desc = total, desc or self.desc
        if self.bar is not None:
            self.bar.total = total
            self.bar.set_description(self.desc, refresh=False)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Extra fields (e.g. the loss) shown on the bar; log lines leave them to the caller."""
        if self.bar is not None:
            self.bar.set_postfix(refresh=refresh, **values)

    def line(self, now: float | None = None) -> str:
        """'<desc>: done/total unit (pct), rate unit/s, H:MM:SS left' (or 'done in' once finished)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        done = self.n - self.initial
        rate = done / elapsed
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.closed:
            parts.append(f"done in {format_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"{format_duration((self.total - self.n) / rate)} left")
        return ", ".join(parts)

    def close(self, failed: bool = False) -> None:
        """Ends the bar, or logs the closing line ('done in ...'; not when the step `failed`)."""
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        elif self.log_every_s is not None and not failed:
            self.log.info("%s", self.line())
