"""The keys under which the payee's aiohttp application holds its parts (set by
:func:`btcchannel.payee.http.create_app`; read by the routes and the paid-route middleware)."""

from __future__ import annotations

from aiohttp import web

from btcchannel.payee.clientlog import ClientErrorLog
from btcchannel.payee.closer import Closer
from btcchannel.payee.service import PayeeService
from btcchannel.payee.watcher import Watcher

__all__ = ["SERVICE", "CLOSER", "WATCHER", "CLIENT_ERRORS"]

SERVICE: web.AppKey[PayeeService] = web.AppKey("btcchannel_service", PayeeService)
CLOSER: web.AppKey[Closer] = web.AppKey("btcchannel_closer", Closer)
WATCHER: web.AppKey[Watcher] = web.AppKey("btcchannel_watcher", Watcher)
CLIENT_ERRORS: web.AppKey[ClientErrorLog] = web.AppKey("btcchannel_client_errors", ClientErrorLog)
