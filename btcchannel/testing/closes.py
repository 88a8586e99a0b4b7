"""Channels funded straight from a node wallet, for tests and benchmarks of closes (no service).

:func:`fund_channels` funds ``k`` channels with one transaction of the node's ``miner`` wallet,
confirms it, and returns each channel's payer and payee machines, open, with one payment
signed by the payer and accepted by the payee; :func:`close_summary` reads a confirmed close
back from the node (size, fee, outputs); :func:`store_open_channels` puts the payee side of such
channels into a payee store, open with their payments, for the payee's closer.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.channel import PayeeChannel, PayerChannel
from btcchannel.core.keys import generate_private_key, public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import p2wpkh_script
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.testing.chain import sats, tx_of

__all__ = ["ChannelPair", "close_summary", "fund_channels", "store_open_channels"]


@dataclass
class ChannelPair:
    """One funded channel: both machines, open, and the amount the payee holds a payment for."""

    payer: PayerChannel
    payee: PayeeChannel
    amount_sat: int


def fund_channels(
    bitcoind: RegtestNode, amounts: list[int], deposit_sat: int, *, lifetime_blocks: int = 100
) -> list[ChannelPair]:
    """One channel per amount, funded in one confirmed transaction, each paid that amount."""
    expiry = bitcoind.tip_height() + lifetime_blocks
    drafts = []
    for _ in amounts:
        payer_key, payee_key = generate_private_key(), generate_private_key()
        params = ChannelParams(
            network="regtest",
            payer_pubkey=public_key(payer_key),
            payee_pubkey=public_key(payee_key),
            expiry_height=expiry,
            deposit_sat=deposit_sat,
            payer_script=p2wpkh_script(public_key(payer_key)),
        )
        drafts.append((params, payer_key, payee_key))
    outputs = {p.funding_address: f"{deposit_sat / 1e8:.8f}" for p, _, _ in drafts}
    txid = bitcoind.rpc("sendmany", "", outputs, wallet="miner")
    bitcoind.mine(1)
    vout_of = {o["scriptPubKey"].get("address"): o["n"] for o in tx_of(bitcoind, txid)["vout"]}
    pairs = []
    for (params, payer_key, payee_key), amount in zip(drafts, amounts):
        funded = params.with_funding(OutPoint(txid, vout_of[params.funding_address]))
        payer = PayerChannel.restore(funded, payer_key, ChannelState.OPEN)
        payment = payer.sign_payment(amount)
        payer.commit_payment(payment)
        payee = PayeeChannel.restore(funded, payee_key, ChannelState.OPEN)
        checked = payee.check_payment(payment.amount_sat, payment.signature)
        assert checked is not None and payee.commit_payment(checked)  # stored by store_open_channels
        pairs.append(ChannelPair(payer, payee, amount))
    return pairs


def close_summary(bitcoind: RegtestNode, txid: str) -> dict[str, Any]:
    """A confirmed close as the node reports it: ``vsize``, ``fee_sat``, ``outputs`` (sat), ``inputs``."""
    tx = tx_of(bitcoind, txid)
    assert tx.get("confirmations", 0) >= 1, "the close is not confirmed"
    value_in = 0
    for vin in tx["vin"]:
        prev = tx_of(bitcoind, vin["txid"])
        value_in += sats(prev["vout"][vin["vout"]]["value"])
    outputs = [sats(o["value"]) for o in tx["vout"]]
    return {
        "vsize": int(tx["vsize"]),
        "fee_sat": value_in - sum(outputs),
        "outputs": outputs,
        "inputs": [(v["txid"], v["vout"]) for v in tx["vin"]],
    }


def store_open_channels(store: PayeeStore, pairs: list[ChannelPair], payout_script: bytes) -> list[str]:
    """The payee side of ``pairs`` as open rows of ``store`` (each with its payment and ``payout_script``),
    for a :class:`~btcchannel.payee.closer.Closer` to close; their channel ids."""
    cids = []
    for pair in pairs:
        params, best = pair.payee.params, pair.payee.best
        assert params.funding is not None and best is not None
        cid = secrets.token_hex(16)
        store.insert_proposal(
            PayeeRecord(
                channel_id=cid,
                state=ChannelState.PROPOSED,
                params=params.to_json(),
                privkey=pair.payee.privkey,
                deposit_sat=params.deposit_sat,
                expiry_height=params.expiry_height,
                created_at=time.time(),
                created_height=0,
                payout_script=payout_script.hex(),
            )
        )
        store.set_funding(cid, params.funding.txid, params.funding.vout, 1)
        store.set_confirmations(cid, 1, open_now=True)
        assert store.record_payment(cid, best.amount_sat, best.signature) is not None
        cids.append(cid)
    return cids
