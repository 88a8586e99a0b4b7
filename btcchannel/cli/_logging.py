"""Logging for the command line: one line per event, as text or as JSON, and no floods.

:class:`JsonFormatter` writes one JSON object per record (``time``, ``level``, ``logger``,
``message`` and any ``event``, ``channel_id``, ``amount_sat``... passed in ``extra``).
:class:`RepeatFilter` (:mod:`btcchannel.logs`) lets a warning through once and then holds back the same warning
(same logger and message template) for ``window_s`` seconds, so a node that is down for an
hour gives a handful of lines, not one per poll; the next one that passes says how many were
held back. :class:`OwnLogsFilter` keeps ``-v`` to btcchannel's own lines: the libraries'
informational lines (httpx's and httpcore's line per RPC request, aiohttp's access log) only
show at ``-vv``; their warnings always do.
"""

from __future__ import annotations

import json
import logging

from btcchannel.logs import RepeatFilter

__all__ = ["EXTRA_FIELDS", "JsonFormatter", "OwnLogsFilter", "RepeatFilter", "setup_logging"]

#: the ``extra`` fields a record may carry into the JSON line
EXTRA_FIELDS = ("event", "channel_id", "amount_sat", "units", "txid", "fee_rate_sat_vb", "payments")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in EXTRA_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, sort_keys=True)


class OwnLogsFilter(logging.Filter):
    """Below WARNING, only btcchannel's own records pass (every record with ``everything``)."""

    def __init__(self, everything: bool) -> None:
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        return (
            self.everything
            or record.levelno >= logging.WARNING
            or record.name == "btcchannel"
            or record.name.startswith("btcchannel.")
        )


def setup_logging(verbose: int, as_json: bool) -> None:
    """Log to stderr: warnings (``-v`` btcchannel's info, ``-vv`` everyone's debug), text or JSON
    lines, repeats held back."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if as_json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(OwnLogsFilter(everything=verbose >= 2))
    handler.addFilter(RepeatFilter())
    setattr(handler, "_btcchannel_cli", True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_btcchannel_cli", False)]:
        root.removeHandler(old)  # ours from an earlier command in this process; others stay
    root.addHandler(handler)
    root.setLevel(logging.WARNING - 10 * min(verbose, 2))
