"""What clients do wrong, counted and logged without floods: :class:`ClientErrorLog`.

A malformed request line or header, a header over the bound, a body cut short by a disconnect or
never sent within the body timeout: these are the client's doing, not the payee's. aiohttp logs
each malformed request at ERROR with a traceback (on its ``logger``); the payee gives aiohttp a
:class:`ClientErrorLog` instead, and its own request handling reports the client's failures to the
same object. Each is counted (:attr:`ClientErrorLog.count`, by kind in :attr:`ClientErrorLog.kinds`)
and logged at INFO, without a traceback, at most once per ``window_s`` seconds: the line says how
many there were since the last one and what the last was.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

__all__ = ["ClientErrorLog"]

#: how often (at most) the client errors are logged
WINDOW_S = 60.0

#: what a client can cause (anything else aiohttp reports is the payee's own failure: an ERROR)
CLIENT_FAULTS = (HttpProcessingError, ConnectionError, asyncio.TimeoutError)


class ClientErrorLog(logging.Logger):
    """A logger for aiohttp's server (its ``logger`` argument) that counts client errors and logs
    them at INFO at most once per ``window_s`` (see the module docstring)."""

    def __init__(self, window_s: float = WINDOW_S, clock: Callable[[], float] | None = None) -> None:
        super().__init__("btcchannel.payee.clients")
        self.parent = logging.getLogger("btcchannel.payee")
        self.window_s = window_s
        self.clock = clock or time.monotonic
        self.count = 0
        self.kinds: Counter[str] = Counter()
        self._since = 0
        self._last_at: float | None = None

    def client_error(self, kind: str, detail: str) -> None:
        """Count one client error of ``kind`` (e.g. ``BadHttpMessage``, ``body_timeout``) and log
        it if the window allows."""
        self.count += 1
        self.kinds[kind] += 1
        self._since += 1
        now = self.clock()
        if self._last_at is not None and now - self._last_at < self.window_s:
            return
        self._last_at = now
        since, self._since = self._since, 0
        self.info(
            "%d client error(s) since the last report (%d in all); the last: %s: %s",
            since,
            self.count,
            kind,
            detail[:200],
        )

    # aiohttp reports a request it cannot parse (and a handler that failed) through these
    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kw: Any) -> None:
        self._from_aiohttp(msg, args, exc_info)

    def error(self, msg: object, *args: Any, **kw: Any) -> None:
        self._from_aiohttp(msg, args, kw.get("exc_info"))

    def _from_aiohttp(self, msg: object, args: tuple[Any, ...], exc_info: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else None
        if exc is None and exc_info:
            exc = sys.exc_info()[1]
        try:
            text = str(msg) % args if args else str(msg)
        except (TypeError, ValueError):
            text = str(msg)
        if exc is not None and not isinstance(exc, CLIENT_FAULTS):
            logging.getLogger("btcchannel.payee.http").error("%s", text, exc_info=exc)  # ours: keep it loud
        elif exc is None:
            self.client_error("request", text)
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.client_error(type(exc).__name__, f"{text}: {first}")
