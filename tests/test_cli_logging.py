"""The CLI's logging: JSON lines with the event fields, and a warning that repeats is held back."""

from __future__ import annotations

import json
import logging

from btcchannel.cli._logging import JsonFormatter, RepeatFilter


def _record(msg: str, level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("btcchannel.payee.watcher", level, __file__, 1, msg, ("x",), None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_a_repeated_warning_passes_once_per_window_and_says_how_many_were_held() -> None:
    now = [0.0]
    f = RepeatFilter(window_s=300, clock=lambda: now[0])
    passed = []
    for _ in range(3600):  # a node down for an hour, polled every second
        rec = _record("watcher step failed: %s")
        if f.filter(rec):
            passed.append(rec.getMessage())
        now[0] += 1.0
    assert len(passed) == 12
    assert passed[0] == "watcher step failed: x"
    assert passed[1] == "watcher step failed: x (299 more like this in the last 300 s)"
    assert f.filter(_record("another warning: %s"))  # another template passes at once
    assert all(f.filter(_record("payment %s", logging.INFO)) for _ in range(5))  # info is never held


def test_json_lines_carry_the_event_fields() -> None:
    line = JsonFormatter().format(
        _record("payment on %s", logging.INFO, event="payment", channel_id="ab" * 16, amount_sat=500)
    )
    doc = json.loads(line)
    assert doc["event"] == "payment" and doc["amount_sat"] == 500 and doc["channel_id"] == "ab" * 16
    assert doc["level"] == "info" and doc["message"] == "payment on x" and doc["logger"] == "btcchannel.payee.watcher"
