"""requests integration: :class:`BtcchannelRequestsAuth` answers the ``Btcchannel`` 402 challenge
of a request made with ``requests`` (made by :meth:`Buyer.requests_auth`)::

    resp = requests.get("https://api.example/answer", auth=buyer.requests_auth())

As httpx's (:mod:`btcchannel.payer.httpx_auth`): the request goes out as it is; on a
``Btcchannel`` 402 it is sent again with the channel's headers and exactly the route's payment;
the response is requests' own (``stream=True`` and ``iter_content()`` work; the 402 is in its
``history``).
"""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase

from btcchannel.payer.challenge import Challenge, ChallengePayer, is_challenge
from btcchannel.wire import HDR_AMOUNT, HDR_SIGNATURE

__all__ = ["BtcchannelRequestsAuth"]


class BtcchannelRequestsAuth(AuthBase):
    """Pays ``Btcchannel`` 402 challenges through a :class:`Buyer`."""

    def __init__(self, buyer: ChallengePayer) -> None:
        self.buyer = buyer

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.register_hook("response", self._answered)
        return request

    def _answered(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        if not is_challenge(response.status_code, response.headers):
            return response
        challenge = Challenge.from_answer(response.headers, response.content)
        first = response.request
        body = first.body.encode() if isinstance(first.body, str) else first.body
        if body is not None and not isinstance(body, bytes):
            raise ValueError("a paid request's body must be bytes or str (it is sent again once paid)")
        paying = self.buyer.call(self.buyer.begin(str(first.method), str(first.url), challenge, body or None))
        history = [response]
        try:
            while True:
                prepared = first.copy()
                prepared.hooks = {"response": []}  # this hook answers once
                for name in (HDR_AMOUNT, HDR_SIGNATURE):
                    prepared.headers.pop(name, None)
                prepared.headers.update(self.buyer.call(paying.headers()))
                response.close()
                sent = response.connection.send(prepared, **kwargs)
                sent.history = list(history)
                sent.request = prepared
                error = sent.content if sent.status_code >= 400 else None
                if self.buyer.call(paying.answered(sent.status_code, sent.headers, error)):
                    return sent
                history.append(sent)
                response = sent
        finally:
            self.buyer.call(paying.close())
