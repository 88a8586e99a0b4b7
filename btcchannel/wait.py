"""Waiting for a condition: poll a predicate until it holds, or fail naming what was awaited.

:func:`wait_until` (blocking) and :func:`wait_until_async` (in an event loop) call the
predicate every ``interval`` seconds until it returns something truthy, and return that
value. After ``timeout`` seconds they raise :class:`TimeoutError` saying how long they
waited and for what: the ``what`` text, else the predicate's name or source line.
Stdlib only, so every layer may use it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast, overload

__all__ = ["wait_until", "wait_until_async"]

T = TypeVar("T")


def _describe(predicate: Callable[..., object], what: str | None) -> str:
    """``what``, else the predicate's name, else its source text (a lambda), else its repr."""
    if what:
        return what
    name = getattr(predicate, "__qualname__", None) or getattr(predicate, "__name__", None)
    if name and "<lambda>" not in name:
        return str(name)
    try:
        source = inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)
    start = source.find("lambda")
    return " ".join((source[start:] if start >= 0 else source).split())


def _timeout_error(predicate: Callable[..., object], timeout: float, what: str | None) -> TimeoutError:
    return TimeoutError(f"timed out after {timeout:g}s waiting for {_describe(predicate, what)}")


def wait_until(
    predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.05, what: str | None = None
) -> T:
    """Call ``predicate`` every ``interval`` s until its value is truthy and return that value.

    Raises :class:`TimeoutError` (naming ``what`` or the predicate) after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timeout_error(predicate, timeout, what)
        time.sleep(interval)


@overload
async def wait_until_async(
    predicate: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    interval: float = ...,
    what: str | None = ...,
) -> T: ...


@overload
async def wait_until_async(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = ...,
    what: str | None = ...,
) -> T: ...


async def wait_until_async(
    predicate: Callable[[], T | None | Awaitable[T | None]],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str | None = None,
) -> T:
    """:func:`wait_until` for an event loop: ``predicate`` may be a plain or a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if time.monotonic() >= deadline:
            raise _timeout_error(predicate, timeout, what)
        await asyncio.sleep(interval)
