"""The channel core on a real regtest bitcoind: every transaction it builds is checked by the node.

- 200 payments in one channel: the close of every state passes ``testmempoolaccept``;
  the last one confirms and pays exactly; older states are then rejected (anti-replay);
- the payee's RBF bump of its close replaces it in the mempool and confirms;
- the payer's refund is ``non-final`` one block before the expiry and confirms at it;
- the full drain (SIGHASH_NONE) confirms;
- two channels settled by one close transaction confirm.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from btcchannel import (
    ChannelParams,
    ChannelState,
    OutPoint,
    PayeeChannel,
    PayerChannel,
    address_to_script,
    build_multi_close,
    generate_private_key,
    public_key,
    script_to_address,
    tx_hex,
    tx_id,
    tx_vsize,
)
from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.errors import RpcAlreadyInChain, RpcVerifyError, RpcVerifyRejected
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.core.tx import SIGHASH_NONE_ACP, SIGHASH_SINGLE_ACP
from btcchannel.errors import NodeError, NotExpired

NET = "regtest"
FEE_RATE = 2.0  # sat/vB


@pytest.fixture
async def node(bitcoind: RegtestNode, funded_wallet: str) -> AsyncIterator[Node]:
    async with Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet=funded_wallet) as n:
        yield n


@dataclass
class Chan:
    payer: PayerChannel
    payee: PayeeChannel
    payee_script: bytes

    @property
    def params(self) -> ChannelParams:
        return self.payee.params

    @property
    def funding(self) -> OutPoint:
        assert self.payee.params.funding is not None
        return self.payee.params.funding


async def open_channel(
    node: Node, bitcoind: RegtestNode, wallet: str, deposit_sat: int, lifetime_blocks: int = 144
) -> Chan:
    """Propose, fund (from the wallet, via Node.fund_output) and report the funding to both sides."""
    payer_key, payee_key = generate_private_key(), generate_private_key()
    payer_script = address_to_script(bitcoind.new_address(wallet), NET)
    payee_script = address_to_script(bitcoind.new_address(wallet), NET)
    tip = await node.tip_height()
    params = ChannelParams(
        network=NET,
        payer_pubkey=public_key(payer_key),
        payee_pubkey=public_key(payee_key),
        expiry_height=tip + lifetime_blocks,
        deposit_sat=deposit_sat,
        payer_script=payer_script,
    )
    # our bech32 agrees with the node's
    assert bitcoind.rpc("decodescript", params.funding_script.hex())["address"] == params.funding_address
    payer, payee = PayerChannel(params, payer_key), PayeeChannel(params, payee_key)
    funding = await node.fund_output(params.funding_script, deposit_sat)
    payer.funding_broadcast(funding)
    payee.funding_seen(funding)
    return Chan(payer, payee, payee_script)


async def confirm_funding(node: Node, bitcoind: RegtestNode, *chans: Chan) -> None:
    bitcoind.mine(1)
    for chan in chans:
        assert await node.tx_confirmations(chan.funding.txid) == 1
        info = await node.get_txout(chan.funding)
        assert info is not None
        assert (info.value_sat, info.script) == (chan.params.deposit_sat, chan.params.funding_script)
        chan.payer.funding_confirmed()
        chan.payee.funding_confirmed()


def pay(chan: Chan, amount_sat: int, tip: int) -> None:
    """The payer signs, stores (commits) and sends; the payee checks and keeps it."""
    payment = chan.payer.sign_payment(amount_sat)
    chan.payer.commit_payment(payment)
    assert chan.payee.accept_payment(payment.amount_sat, payment.signature, tip) is True


async def outputs_on_chain(node: Node, txid: str) -> list[tuple[int, bytes]]:
    """(value_sat, script) of every output of a transaction the node knows."""
    tx = await node.get_transaction(txid)
    assert tx is not None, txid
    return [(btc_to_sat(o["value"]), bytes.fromhex(o["scriptPubKey"]["hex"])) for o in tx["vout"]]


async def inputs_on_chain(node: Node, txid: str) -> list[OutPoint]:
    tx = await node.get_transaction(txid)
    assert tx is not None, txid
    return [OutPoint(i["txid"], i["vout"]) for i in tx["vin"]]


def close_fee(close: Any, paid_sat: int) -> int:
    """The fee of a close: what the payee was paid minus what its output receives."""
    return paid_sat - int(close.vout[-1].nValue)


# ---------------------------------------------------------------------------- 200 payments


async def test_200_payments_every_close_accepted_last_confirms_older_rejected(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    deposit = 1_000_000
    chan = await open_channel(node, bitcoind, funded_wallet, deposit)
    await confirm_funding(node, bitcoind, chan)
    tip = await node.tip_height()

    rng = random.Random(200)
    closes: list[tuple[int, str]] = []  # (amount, close hex) of every state
    amount = 1_000  # a close must leave the payee fee + dust (~640 sat here): start above that
    for _ in range(200):
        amount += rng.randint(1, 4_000)
        pay(chan, amount, tip)
        close = chan.payee.build_close(chan.payee_script, FEE_RATE)
        # the payer gets exactly deposit - A back, the payee A - fee; the fee covers the rate
        assert [(o.nValue, bytes(o.scriptPubKey)) for o in close.vout] == [
            (deposit - amount, chan.params.payer_script),
            (amount - close_fee(close, amount), chan.payee_script),
        ]
        assert close_fee(close, amount) >= FEE_RATE * tx_vsize(close)
        ok, reason = await node.test_mempool_accept(tx_hex(close))
        assert ok, f"close of state {len(closes)} (A={amount}) rejected: {reason}"
        closes.append((amount, tx_hex(close)))
    assert chan.payer.amount_sat == chan.payee.amount_sat == amount
    best = chan.payee.best
    assert best is not None
    assert chan.payee.accept_payment(best.amount_sat, best.signature, tip) is False  # a retry

    # the payee closes with the last state
    last_amount, last_hex = closes[-1]
    last_close = chan.payee.build_close(chan.payee_script, FEE_RATE)
    assert tx_hex(last_close) == last_hex  # deterministic
    fee = close_fee(last_close, last_amount)
    close_txid = await node.broadcast(last_hex)
    chan.payee.closing()
    # while it is in the mempool an older state cannot replace it (it pays no more fee)
    ok, reason = await node.test_mempool_accept(closes[-2][1])
    assert not ok and reason is not None and reason.startswith("insufficient fee"), reason
    bitcoind.mine(1)
    assert await node.tx_confirmations(close_txid) == 1
    chan.payee.closed()
    chan.payer.closed()

    assert await outputs_on_chain(node, close_txid) == [
        (deposit - last_amount, chan.params.payer_script),  # payer change == deposit - A
        (last_amount - fee, chan.payee_script),  # payee output == A - fee
    ]
    assert FEE_RATE * tx_vsize(last_close) <= fee < FEE_RATE * tx_vsize(last_close) + 1
    assert await inputs_on_chain(node, close_txid) == [chan.funding]
    assert await node.find_spender(chan.funding, await node.tip_height() - 1) == close_txid
    # the payer's wallet really received its change
    change = await node.get_txout(OutPoint(close_txid, 0))
    assert change is not None and change.value_sat == deposit - last_amount
    payer_address = script_to_address(chan.params.payer_script, NET)
    assert bitcoind.rpc("getaddressinfo", payer_address, wallet=funded_wallet)["ismine"]

    # anti-replay: every older state now spends a spent output
    for index in (0, 1, 99, 198):
        older = closes[index][1]
        ok, reason = await node.test_mempool_accept(older)
        assert not ok and reason == "missing-inputs", (index, reason)
        with pytest.raises(NodeError) as e:
            await node.broadcast(older)
        assert e.value.rpc_code == RpcVerifyError.RPC_ERROR_CODE, e.value.message
    with pytest.raises(NodeError) as e:
        await node.broadcast(last_hex)
    assert e.value.rpc_code == RpcAlreadyInChain.RPC_ERROR_CODE


# ---------------------------------------------------------------------------- RBF


async def test_rbf_bump_of_the_close_replaces_it_and_confirms(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    deposit = 500_000
    chan = await open_channel(node, bitcoind, funded_wallet, deposit)
    await confirm_funding(node, bitcoind, chan)
    tip = await node.tip_height()
    for amount in (10_000, 25_000, 120_000):
        pay(chan, amount, tip)

    slow = chan.payee.build_close(chan.payee_script, 1.0)
    slow_txid = await node.broadcast(tx_hex(slow))
    chan.payee.closing()
    assert await node.tx_confirmations(slow_txid) == 0

    fast = chan.payee.build_close(chan.payee_script, 10.0)  # same payer signature, new fee
    fast_txid = tx_id(fast)
    assert fast_txid != slow_txid
    assert close_fee(fast, 120_000) > close_fee(slow, 120_000) + tx_vsize(fast)  # pays the relay increment
    assert fast.vout[0].nValue == slow.vout[0].nValue == deposit - 120_000  # the payer's change is untouched
    assert await node.test_mempool_accept(tx_hex(fast)) == (True, None)
    assert await node.broadcast(tx_hex(fast)) == fast_txid
    assert await node.tx_confirmations(slow_txid) is None  # replaced
    assert await node.tx_confirmations(fast_txid) == 0
    assert await node.find_spender(chan.funding, tip) == fast_txid
    # the cheaper one cannot come back
    ok, _ = await node.test_mempool_accept(tx_hex(slow))
    assert not ok

    bitcoind.mine(1)
    assert await node.tx_confirmations(fast_txid) == 1
    assert await node.tx_confirmations(slow_txid) is None
    assert await outputs_on_chain(node, fast_txid) == [
        (deposit - 120_000, chan.params.payer_script),
        (120_000 - close_fee(fast, 120_000), chan.payee_script),
    ]
    chan.payee.closed()


# ---------------------------------------------------------------------------- refund


async def test_refund_is_non_final_before_expiry_and_confirms_at_expiry(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    deposit = 300_000
    chan = await open_channel(node, bitcoind, funded_wallet, deposit, lifetime_blocks=12)
    await confirm_funding(node, bitcoind, chan)
    expiry = chan.params.expiry_height
    pay(chan, 50_000, await node.tip_height())  # the payee then vanishes without closing
    payee_close = chan.payee.build_close(chan.payee_script, FEE_RATE)

    bitcoind.mine(expiry - 1 - await node.tip_height())
    tip = await node.tip_height()
    assert tip == expiry - 1
    with pytest.raises(NotExpired):
        chan.payer.build_refund(tip, FEE_RATE)
    early = chan.payer.build_refund(expiry, FEE_RATE)  # as if the tip were at the expiry already
    assert early.nLockTime == expiry
    ok, reason = await node.test_mempool_accept(tx_hex(early))
    assert not ok and reason is not None and reason.startswith("non-final"), reason
    with pytest.raises(NodeError) as e:
        await node.broadcast(tx_hex(early))
    assert e.value.rpc_code == RpcVerifyRejected.RPC_ERROR_CODE and "non-final" in e.value.message

    bitcoind.mine(1)
    tip = await node.tip_height()
    assert tip == expiry
    refund = chan.payer.build_refund(tip, FEE_RATE)
    assert await node.test_mempool_accept(tx_hex(refund)) == (True, None)
    refund_txid = await node.broadcast(tx_hex(refund))
    chan.payer.closing()
    bitcoind.mine(1)
    assert await node.tx_confirmations(refund_txid) == 1
    chan.payer.refunded()
    assert chan.payer.state is ChannelState.REFUNDED

    fee = deposit - int(refund.vout[0].nValue)
    assert fee >= FEE_RATE * tx_vsize(refund)
    assert await outputs_on_chain(node, refund_txid) == [(deposit - fee, chan.params.payer_script)]
    assert await node.find_spender(chan.funding, expiry - 6) == refund_txid
    # the payee's close came too late
    ok, reason = await node.test_mempool_accept(tx_hex(payee_close))
    assert not ok and reason == "missing-inputs"


# ---------------------------------------------------------------------------- full drain


async def test_full_drain_close_confirms(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    deposit = 100_000
    chan = await open_channel(node, bitcoind, funded_wallet, deposit)
    await confirm_funding(node, bitcoind, chan)
    tip = await node.tip_height()
    pay(chan, 40_000, tip)
    assert chan.payee.best is not None and chan.payee.best.signature[-1] == SIGHASH_SINGLE_ACP
    partial = chan.payee.build_close(chan.payee_script, FEE_RATE)
    assert await node.test_mempool_accept(tx_hex(partial)) == (True, None)

    pay(chan, deposit, tip)  # the whole deposit
    assert chan.payee.best is not None and chan.payee.best.signature[-1] == SIGHASH_NONE_ACP
    close = chan.payee.build_close(chan.payee_script, FEE_RATE)
    assert len(close.vout) == 1  # no payer output
    assert await node.test_mempool_accept(tx_hex(close)) == (True, None)
    txid = await node.broadcast(tx_hex(close))
    bitcoind.mine(1)
    assert await node.tx_confirmations(txid) == 1
    fee = close_fee(close, deposit)
    assert fee >= FEE_RATE * tx_vsize(close)
    assert await outputs_on_chain(node, txid) == [(deposit - fee, chan.payee_script)]
    assert await inputs_on_chain(node, txid) == [chan.funding]


# ---------------------------------------------------------------------------- several channels


@pytest.mark.parametrize("second_drained", [False, True], ids=["two-partial", "partial-and-drain"])
async def test_two_channels_closed_in_one_transaction(
    node: Node, bitcoind: RegtestNode, funded_wallet: str, second_drained: bool
) -> None:
    a = await open_channel(node, bitcoind, funded_wallet, 200_000)
    b = await open_channel(node, bitcoind, funded_wallet, 150_000)
    await confirm_funding(node, bitcoind, a, b)
    tip = await node.tip_height()
    for amount in (1_000, 2_000, 70_000):
        pay(a, amount, tip)
    for amount in (5_000, 150_000 if second_drained else 90_000):
        pay(b, amount, tip)
    paid = a.payee.amount_sat + b.payee.amount_sat

    close = build_multi_close(
        [b.payee, a.payee] if not second_drained else [a.payee, b.payee], a.payee_script, FEE_RATE
    )
    assert await node.test_mempool_accept(tx_hex(close)) == (True, None)
    txid = await node.broadcast(tx_hex(close))
    bitcoind.mine(1)
    assert await node.tx_confirmations(txid) == 1

    fee = close_fee(close, paid)
    assert fee >= FEE_RATE * tx_vsize(close)
    on_chain = await outputs_on_chain(node, txid)
    inputs = await inputs_on_chain(node, txid)
    assert sorted(inputs, key=str) == sorted([a.funding, b.funding], key=str)
    # each payer's change sits at the index of its channel's input; one payee output last
    changes = {inputs[i]: on_chain[i] for i in range(len(on_chain) - 1)}
    assert changes[a.funding] == (200_000 - 70_000, a.params.payer_script)
    if second_drained:
        assert b.funding not in changes and inputs[-1] == b.funding
    else:
        assert changes[b.funding] == (150_000 - 90_000, b.params.payer_script)
    assert on_chain[-1] == (paid - fee, a.payee_script)
    assert len(on_chain) == (2 if second_drained else 3)
    for chan in (a, b):
        assert await node.find_spender(chan.funding, tip) == txid
