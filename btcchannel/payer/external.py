"""Funding a proposed channel from any wallet: what to pay (address, exact amount, an unsigned PSBT),
then the signed transaction handed back, or seen on the chain, registered with the payee.

btcchannel never asks a wallet to sign here. The PSBT, when the node's wallet (``--wallet``; a
watch-only wallet of a hardware or other external signer will do) can fund the amount, is its
``walletcreatefundedpsbt`` of the one funding output: the external signer signs and finalizes it
and hands back the transaction. Any wallet can instead pay the exact amount to the address.

Entry points::

    async funding_request(client, channel_id, *, fee_rate_sat_vb=None) -> dict   # address, amount, psbt
    funding_outpoint(params, tx_hex) -> OutPoint        # the output of tx_hex that funds the channel
    async fund_with_tx(client, channel_id, tx_hex) -> OutPoint   # check, broadcast, record, register
    async wait_for_funding(client, channel_id, timeout) -> OutPoint  # until the funding is in a block
    pending_proposal(client, server_url, channel_id=None) -> str     # the proposal awaiting a funding
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from bitcoin.core import CTransaction
from bitcoin.core.serialize import SerializationError

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.bitcoind.errors import RpcAlreadyInChain
from btcchannel.core.descriptor import funding_descriptor
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint, tx_id
from btcchannel.errors import BadRequest, ChannelClosed, ChannelError, FundingMismatch, NotOpen, OpenTimeout
from btcchannel.payer.views import to_payee

if TYPE_CHECKING:
    from btcchannel.payer.client import PayerClient
    from btcchannel.store.payer import PayerRecord

__all__ = [
    "LAPSE_MARGIN_S",
    "funding_outpoint",
    "funding_request",
    "fund_with_tx",
    "pending_proposal",
    "wait_for_funding",
]


#: a stateless proposal's funding is not broadcast in the last this many seconds of its token (at
#: most a tenth of the payee's ``proposal_ttl_s``): the funding report's way to the payee, and the
#: clocks of the payee's instances (the token is checked on the clock of the one that gets the
#: report), take some of that time, and a funding the payee refuses is locked until the expiry
LAPSE_MARGIN_S = 30.0


def _lapses_soon(rec: PayerRecord) -> bool:
    """Whether stateless proposal ``rec`` is within :data:`LAPSE_MARGIN_S` of its token's lapse."""
    if rec.proposal_expires_at is None:
        return False
    margin = min(LAPSE_MARGIN_S, max(rec.proposal_expires_at - rec.created_at, 0.0) / 10)
    return time.time() >= rec.proposal_expires_at - margin


def _params(client: PayerClient, channel_id: str) -> ChannelParams:
    return ChannelParams.from_json(client.record(channel_id).params)


async def funding_request(
    client: PayerClient, channel_id: str, *, fee_rate_sat_vb: float | None = None
) -> dict[str, Any]:
    """What funds proposed channel ``channel_id``: ``funding_address``, ``amount_sat`` (exactly),
    ``amount_btc``, the output's ``descriptor`` and ``psbt`` (base64; None when the node's wallet
    cannot fund it: pay the address from any wallet instead, with ``psbt_problem`` saying why)."""
    params = _params(client, channel_id)
    psbt: str | None = None
    problem: str | None = None
    options: dict[str, Any] = {"change_type": "bech32", "changePosition": 1, "includeWatching": True}
    if fee_rate_sat_vb is not None:
        options["fee_rate"] = f"{fee_rate_sat_vb:.3f}"
    try:
        made = await client.node.call(
            "walletcreatefundedpsbt",
            [],
            [{params.funding_address: sat_to_btc(params.deposit_sat)}],
            0,
            options,
            True,
            wallet=client.node.wallet,
        )
        psbt = str(made["psbt"])
    except ChannelError as exc:  # no wallet, no funds: the address and the amount still fund it
        problem = str(exc)
    return {
        "channel_id": channel_id,
        "funding_address": params.funding_address,
        "amount_sat": params.deposit_sat,
        "amount_btc": sat_to_btc(params.deposit_sat),
        "descriptor": funding_descriptor(params),
        "expiry_height": params.expiry_height,
        "psbt": psbt,
        "psbt_problem": problem,
    }


def funding_outpoint(params: ChannelParams, tx_hex: str) -> OutPoint:
    """The first output of the signed transaction ``tx_hex`` paying exactly the deposit to the funding
    script; BadRequest if it does not parse, FundingMismatch if no output funds the channel."""
    try:
        tx = CTransaction.deserialize(bytes.fromhex(tx_hex.strip()))
    except (ValueError, TypeError, IndexError, SerializationError) as exc:
        raise BadRequest(f"the funding transaction does not parse: {exc}") from None
    for n, out in enumerate(tx.vout):
        if bytes(out.scriptPubKey) == params.funding_script and out.nValue == params.deposit_sat:
            return OutPoint(tx_id(tx), n)
    raise FundingMismatch(f"no output of {tx_id(tx)} pays exactly {params.deposit_sat} sat to {params.funding_address}")


async def fund_with_tx(client: PayerClient, channel_id: str, tx_hex: str) -> OutPoint:
    """Check that ``tx_hex`` funds proposed channel ``channel_id`` and that the payee still holds the
    proposal (ChannelClosed when it lapsed or was cancelled, or a stateless proposal's token lapses
    within :data:`LAPSE_MARGIN_S`: nothing is broadcast), broadcast it through
    the node (one already in a block is fine), record the outpoint and register it with the payee."""
    rec = client.record(channel_id)
    if rec.state is not ChannelState.PROPOSED or rec.funding_txid is not None:
        raise BadRequest(f"channel {channel_id} is {rec.state.value}, not a proposal awaiting its funding")
    outpoint = funding_outpoint(ChannelParams.from_json(rec.params), tx_hex)
    state = (await client.status(channel_id)).get("state")
    if state != ChannelState.PROPOSED:  # lapsed or cancelled: a funding now would be locked until the expiry
        raise ChannelClosed(
            f"the payee reports channel {channel_id} {state}, not a proposal awaiting its funding: "
            "not broadcasting (open a new channel)"
        )
    if _lapses_soon(rec):
        raise ChannelClosed(
            f"the payee's token for channel {channel_id} lapses in less than {LAPSE_MARGIN_S:g} s: "
            "not broadcasting (open a new channel)"
        )
    try:
        await client.node.broadcast(tx_hex.strip())
    except RpcAlreadyInChain:
        pass
    client.record_funding(channel_id, outpoint)
    await client.register_funding(channel_id)
    return outpoint


async def wait_for_funding(client: PayerClient, channel_id: str, timeout: float, poll_s: float = 1.0) -> OutPoint:
    """Wait (up to ``timeout`` s) until a block holds an unspent output of exactly the deposit to the
    channel's funding script (``scantxoutset``), then record and register it; OpenTimeout otherwise."""
    params = _params(client, channel_id)
    deadline = time.monotonic() + timeout
    while True:
        found = await client.node.call("scantxoutset", "start", [f"raw({params.funding_script.hex()})"])
        for utxo in found.get("unspents", []) if isinstance(found, dict) else []:
            if btc_to_sat(utxo["amount"]) == params.deposit_sat:
                outpoint = OutPoint(str(utxo["txid"]), int(utxo["vout"]))
                client.record_funding(channel_id, outpoint)
                await client.register_funding(channel_id)
                return outpoint
        if time.monotonic() > deadline:
            raise OpenTimeout(
                f"no funding of channel {channel_id} ({params.deposit_sat} sat to "
                f"{params.funding_address}) in a block after {timeout:g} s; it can still be "
                f"registered with `open URL --funding-tx HEX --channel {channel_id}`"
            )
        await asyncio.sleep(poll_s)


def pending_proposal(client: PayerClient, server_url: str, channel_id: str | None = None) -> str:
    """``channel_id``, or the newest proposal to ``server_url``'s payee with no funding recorded;
    NotOpen when there is none."""
    if channel_id is not None:
        client.record(channel_id)
        return channel_id
    for rec in to_payee(client.list(), server_url):  # newest first
        if rec.state is ChannelState.PROPOSED and rec.funding_txid is None:
            return rec.channel_id
    raise NotOpen(f"no proposal to {server_url} awaits its funding: open one with --psbt first")
