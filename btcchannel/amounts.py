"""Conversions between integer satoshis and the node's BTC amounts.

Amounts are integer satoshis everywhere in btcchannel; bitcoind speaks BTC.
These two functions are the only place the two meet (the RPC edge).
"""

from __future__ import annotations

from decimal import Decimal

COIN = 100_000_000


def btc_to_sat(value: float | int | str | Decimal) -> int:
    """An amount as bitcoind returns it (a JSON number, parsed as float) in satoshis, exactly."""
    sats = Decimal(str(value)) * COIN
    if sats != sats.to_integral_value():
        raise ValueError(f"not a whole number of satoshis: {value!r}")
    return int(sats)


def sat_to_btc(sats: int) -> str:
    """Satoshis as a BTC decimal string for an RPC parameter (never a float)."""
    if isinstance(sats, bool) or not isinstance(sats, int):
        raise TypeError("amounts are integer satoshis")
    return f"{Decimal(sats) / COIN:.8f}"
