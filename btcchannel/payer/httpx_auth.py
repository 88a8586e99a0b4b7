"""httpx integration: :class:`BtcchannelAuth` answers the ``Btcchannel`` 402 challenge of any
request made through ``httpx.Client`` or ``httpx.AsyncClient`` (made by :meth:`Buyer.httpx_auth`)::

    with httpx.Client(auth=buyer.httpx_auth()) as http:
        resp = http.get("https://api.example/answer")         # paid if the route asks for it

The request goes out as it is; on a ``Btcchannel`` 402 it is sent again with the channel's
headers and exactly the route's payment (:class:`~btcchannel.payer.buyer.Buyer`). A 402 reached
through a redirect (``follow_redirects=True``) is paid at the URL that answered it, as requests does
(the signature covers that request; the budget applies as to any route). The response
is httpx's own: headers, ``iter_bytes()`` and ``client.stream(...)`` work as ever (only an
error answer's body is read by the flow).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from btcchannel.payer.challenge import Challenge, ChallengePayer, PayingRequest, is_challenge
from btcchannel.wire import HDR_AMOUNT, HDR_SIGNATURE

__all__ = ["BtcchannelAuth"]


def _set(request: httpx.Request, headers: dict[str, str]) -> None:
    for name in (HDR_AMOUNT, HDR_SIGNATURE):  # a retry without a payment carries none
        if name in request.headers:
            del request.headers[name]
    request.headers.update(headers)


class BtcchannelAuth(httpx.Auth):
    """Pays ``Btcchannel`` 402 challenges through a :class:`Buyer` (sync and async clients)."""

    requires_request_body = True  # a paid request is sent again, body included

    def __init__(self, buyer: ChallengePayer) -> None:
        self.buyer = buyer

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        response = yield request
        if not is_challenge(response.status_code, response.headers):
            return
        response.read()
        request = response.request  # the request the 402 answered (after redirects: the last hop's)
        request.read()
        challenge = Challenge.from_answer(response.headers, response.content)
        paying: PayingRequest = self.buyer.call(
            self.buyer.begin(request.method, str(request.url), challenge, request.content or None)
        )
        try:
            while True:
                _set(request, self.buyer.call(paying.headers()))
                response = yield request
                body = response.read() if response.status_code >= 400 else None
                if self.buyer.call(paying.answered(response.status_code, response.headers, body)):
                    return
                response.close()
        finally:
            self.buyer.call(paying.close())

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        response = yield request
        if not is_challenge(response.status_code, response.headers):
            return
        await response.aread()
        request = response.request  # the request the 402 answered (after redirects: the last hop's)
        await request.aread()
        challenge = Challenge.from_answer(response.headers, response.content)
        paying = await self.buyer.acall(
            self.buyer.begin(request.method, str(request.url), challenge, request.content or None)
        )
        try:
            while True:
                _set(request, await self.buyer.acall(paying.headers()))
                response = yield request
                body = await response.aread() if response.status_code >= 400 else None
                if await self.buyer.acall(paying.answered(response.status_code, response.headers, body)):
                    return
                await response.aclose()
        finally:
            await self.buyer.acall(paying.close())
