"""The payer's HTTP side: one session, JSON requests with typed errors, the payee's info.

:class:`PayeeHttp` is the base of :class:`~btcchannel.payer.client.PayerClient`: every call
has a timeout; a payee that cannot be reached raises ``PayeeUnreachable``; the payee's error
codes come back as the typed errors of ``btcchannel.errors``, marked ``remote``; an answer that contradicts the
protocol raises ``ProtocolViolation``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from btcchannel.core.terms import Terms
from btcchannel.errors import BadRequest, ChannelError, PayeeUnreachable, ProtocolViolation, error_for_code
from btcchannel.payer.views import check_payee_url, payee_unreachable

__all__ = ["PayeeHttp"]


class PayeeHttp:
    """HTTP to payees: ``timeout`` seconds per call, one shared session (closed by the subclass)."""

    timeout: float
    _session: aiohttp.ClientSession | None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared HTTP session (created on first use)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    # -- HTTP -----------------------------------------------------------------------
    async def request(self, method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """One JSON request; typed errors for error bodies, ``PayeeUnreachable`` if unreachable
        (``BadUrl`` for a URL without http(s)://)."""
        check_payee_url(url)
        try:
            async with self.session.request(method, url, json=body) as resp:
                status = resp.status
                try:
                    data = await resp.json(content_type=None)
                except ValueError as exc:
                    raise ProtocolViolation(f"{method} {url}: answer is not JSON (HTTP {status})") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.unreachable(method, url, exc) from exc
        if status >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict) and isinstance(err.get("code"), str):
                raise error_for_code(err["code"], str(err.get("message", "")), remote=True)  # the payee's word
            raise ProtocolViolation(f"{method} {url}: HTTP {status} without an error body")
        return status, data

    def unreachable(self, method: str, url: str, exc: BaseException) -> PayeeUnreachable:
        """The error for an HTTP call to the payee that got no answer, saying why in words."""
        return payee_unreachable(method, url, exc, self.timeout)

    async def get_object(self, url: str) -> dict[str, Any]:
        """GET a JSON object outside the channel protocol (e.g. a paid file's index).

        ``BadRequest`` unless the answer is HTTP 200, ``PayeeUnreachable`` if no answer.
        """
        check_payee_url(url)
        try:
            async with self.session.get(url) as resp:
                if resp.status != 200:
                    raise BadRequest(f"{url}: HTTP {resp.status}")
                data = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self.unreachable("GET", url, exc) from exc
        if not isinstance(data, dict):
            raise ProtocolViolation(f"{url}: the answer is not a JSON object")
        return data

    async def info(self, server_url: str) -> dict[str, Any]:
        """The payee's ``GET /v1/info``."""
        _, data = await self.request("GET", f"{server_url.rstrip('/')}/v1/info")
        if not isinstance(data, dict):
            raise ProtocolViolation("info is not an object")
        return data

    @staticmethod
    def _required_terms(info: dict[str, Any]) -> Terms:
        """The terms a payee requires, from its ``/v1/info`` (``terms``, or the older top-level fields)."""
        try:
            if "terms" in info:
                return Terms.from_json(info["terms"]).required()
            return Terms(
                int(info.get("price_sat") or 0),
                str(info.get("mode") or "prepay"),
                int(info.get("credit_limit_sat") or 0),
            )
        except (ChannelError, TypeError, ValueError) as exc:
            raise ProtocolViolation(f"the payee's terms are invalid: {exc}") from None
