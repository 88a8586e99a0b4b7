"""Logging without floods, for every entry point: :class:`RepeatFilter` and :func:`hold_back_repeats`.

A warning that repeats on every poll (the node in initial block download, a node that does not
answer) would otherwise be logged hundreds of times an hour by whoever runs the library: the
CLI, ``python -m btcchannel.payee``, an application embedding the payee. :class:`RepeatFilter`
lets a warning (or error) through once and then holds back the same one for ``window_s``
seconds; the next one that passes says how many were held back. :func:`hold_back_repeats` puts
one such filter on every ``btcchannel`` logger, so the library's own records are held back
whatever handlers the application configured (the payee's app calls it when it starts).

"The same" is the logger, the level and the message template; with ``by_args`` (the library's
filter) also the arguments, so that the same warning about two different channels is two
warnings.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RepeatFilter", "hold_back_repeats"]

#: how long the library holds back a repeated warning
WINDOW_S = 300.0

#: at most this many different warnings are remembered (the oldest are forgotten first)
MAX_KEYS = 10_000


class RepeatFilter(logging.Filter):
    """Warnings and errors of the same template (and arguments, with ``by_args``) pass once per
    ``window_s`` seconds."""

    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] | None = None, *, by_args: bool = False
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.clock = clock or time.monotonic
        self.by_args = by_args
        self._last: dict[tuple[str, int, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        try:
            args = repr(record.args) if self.by_args else ""
        except Exception:  # noqa: BLE001 - an argument whose repr fails: key on the template alone
            args = ""
        key = (record.name, record.levelno, str(record.msg), args)
        now = self.clock()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.window_s:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        held = seen[1] if seen is not None else 0
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        while len(self._last) > MAX_KEYS:
            del self._last[next(iter(self._last))]
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.window_s:g} s)"
        return True


_LIBRARY_FILTER = "_btcchannel_repeats"


def hold_back_repeats(prefix: str = "btcchannel", window_s: float = WINDOW_S) -> None:
    """Put one :class:`RepeatFilter` (by template and arguments) on every logger named ``prefix`` or
    ``prefix.*`` that exists now (each at most once; loggers of modules imported later get it on
    the next call)."""
    shared = getattr(logging.getLogger(prefix), _LIBRARY_FILTER, None)
    if shared is None:
        shared = RepeatFilter(window_s, by_args=True)
        setattr(logging.getLogger(prefix), _LIBRARY_FILTER, shared)
    names = [prefix] + [n for n in list(logging.root.manager.loggerDict) if n.startswith(prefix + ".")]
    for name in names:
        logger = logging.getLogger(name)
        if shared not in logger.filters:
            logger.addFilter(shared)
