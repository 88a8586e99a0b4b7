"""The payer's reading of a 402 (no node): the Btcchannel challenge's auth-params, the protocol URL
it names, and the one check before paying: a route is paid only at its units times the agreed price."""

from __future__ import annotations

import json

import pytest

from btcchannel.core.terms import Metering
from btcchannel.errors import ProtocolViolation, TermsRefused
from btcchannel.payee.gate import www_authenticate
from btcchannel.payer.buy import Budget, open_command
from btcchannel.payer.challenge import Challenge, parse_www_authenticate


def test_the_payees_header_reads_back() -> None:
    params = {
        "realm": "https://api.example/btc",
        "network": "signet",
        "info": "https://api.example/btc/v1/info",
        "channels": "https://api.example/btc/v1/channels",
        "price_sat": 250,
        "units": 250,
        "mode": "prepay",
        "channel": None,
        "odd": 'a "quoted", \\ value',
    }
    parsed = parse_www_authenticate(www_authenticate(params))
    assert parsed == {k: str(v) for k, v in params.items() if v is not None}
    assert parse_www_authenticate('Basic realm="x"') is None


def test_challenge_from_header_and_body() -> None:
    header = www_authenticate(
        {
            "info": "https://api.example/btc/v1/info",
            "channels": "https://api.example/btc/v1/channels",
            "price_sat": 250,
            "units": 250,
            "network": "signet",
            "mode": "prepay",
        }
    )
    c = Challenge.from_answer({"WWW-Authenticate": header}, None)
    assert (c.protocol_url, c.price_sat, c.units, c.unit_price_sat) == ("https://api.example/btc", 250, 250, 1)
    body = json.dumps(
        {
            "payment": {
                "info_url": "http://h:1/v1/info",
                "channels_url": "http://h:1/v1/channels",
                "route_price_sat": 300,
                "units": 3,
            }
        }
    ).encode()
    older = Challenge.from_answer({}, body)  # a payee without the header: the body's fields
    assert (older.protocol_url, older.price_sat, older.units) == ("http://h:1", 300, 3)
    with pytest.raises(ProtocolViolation):
        Challenge.from_answer({"WWW-Authenticate": 'Basic realm="x"'}, b"{}")


def test_a_route_is_paid_only_at_the_agreed_price() -> None:
    c = Challenge(units=250, price_sat=250, info_url="http://h/btc/v1/info", channels_url="")
    assert c.units_for(Metering(1, "prepay", 0)) == 250
    with pytest.raises(ProtocolViolation):  # the channel agreed 2 sat a unit: 250 units would be 500 sat
        c.units_for(Metering(2, "prepay", 0))
    with pytest.raises(TermsRefused):
        Budget(max_price_sat=0).check(c)
    with pytest.raises(TermsRefused):
        Budget(max_total_sat=200).check(c)
    Budget(max_price_sat=1, max_total_sat=250).check(c)
    assert open_command(c) == "btcchannel open http://h/btc --deposit-sat 25000 --lifetime-blocks 144 --max-price-sat 1"
