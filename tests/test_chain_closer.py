"""A crash-safe closer on a real regtest node: the payout script is fixed per channel, the close is
recorded before it is broadcast, a restarted payee sends the same close or adopts the one that
confirmed, and the operator's close works with the node down."""

from __future__ import annotations

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import ChannelClosing, ChannelError
from btcchannel.payee.closer import Closer, operator_close
from btcchannel.payee.http import CLOSER, WATCHER
from btcchannel.payer.client import PayerClient
from btcchannel.store import PayeeStore
from btcchannel.testing import open_channel, tx_of, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


async def _crash_after_recording(
    factory: PayeeFactory, payer: PayerClient, bitcoind: RegtestNode, *, sent: bool
) -> tuple[str, str, str]:
    """A payee whose process dies right after recording its close (``sent``: after its broadcast too).

    Returns (channel id, recorded close txid, the channel's stored payout script)."""
    srv = await factory.start()
    cid = await open_channel(payer, bitcoind, srv.url, 100_000, 60)
    await payer.pay(cid, 20_000)
    payout = srv.store.get(cid).payout_script
    assert payout is not None and bytes.fromhex(payout) == srv.app[CLOSER].payee_script
    await srv.stop()
    # the dying process: claim, build and record its close exactly as the closer does
    store = PayeeStore(srv.config.db_path)
    try:
        closer = Closer(srv.config, store, factory.node())
        await closer.start()
        assert store.claim_close(cid, "operator") is not None
        rec, recorded = await closer.record_close(cid, None, None)
        assert recorded and rec.close_tx_txid is not None and rec.close_tx is not None
        assert rec.close_txid is None  # recorded, not (known to be) broadcast
        if sent:
            assert await factory.node().broadcast(rec.close_tx) == rec.close_tx_txid
        assert rec.close_tx_txid not in bitcoind.rpc("getrawmempool") or sent
        return cid, rec.close_tx_txid, payout
    finally:
        store.close()


async def test_close_recorded_but_not_sent_is_sent_byte_for_byte_after_restart(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    cid, txid, payout = await _crash_after_recording(payee_factory, payer_client, bitcoind, sent=False)
    srv = await payee_factory.start(payee_factory.config())  # a new wallet address for this process
    assert srv.app[CLOSER].payee_script.hex() != payout
    await wait_until_async(lambda: txid in bitcoind.rpc("getrawmempool"), timeout=30, what="recorded close sent")
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    rec = srv.store.get(cid)
    assert rec.close_txid == txid and rec.close_txids == [txid]
    close = tx_of(bitcoind, txid)
    assert close["vout"][1]["scriptPubKey"]["hex"] == payout  # the script fixed at the channel's creation


async def test_close_sent_then_crash_is_adopted_once_confirmed(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    cid, txid, payout = await _crash_after_recording(payee_factory, payer_client, bitcoind, sent=True)
    bitcoind.mine(1)  # the close confirms while no payee runs
    srv = await payee_factory.start(payee_factory.config())
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="close adopted")
    rec = srv.store.get(cid)
    assert rec.close_txid == txid and rec.close_txids == [txid]
    assert tx_of(bitcoind, txid)["vout"][1]["scriptPubKey"]["hex"] == payout


async def test_operator_close_with_the_node_down(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start()
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000, 60)
    await payer_client.pay(cid, 20_000)
    async with Node("http://127.0.0.1:1", auth=("nobody", "nothing"), timeout=2.0) as dead:
        obj = await operator_close(srv.config, dead, cid)  # the operator's node does not answer
    assert obj["state"] == "closing" and obj["end_reason"] == "operator"
    with pytest.raises(ChannelClosing):
        await payer_client.pay(cid, 1_000)
    # the running service broadcasts the claimed close at once
    await wait_until_async(lambda: srv.store.get(cid).close_txid is not None, timeout=10, what="close broadcast")
    txid = srv.store.get(cid).close_txid
    assert txid in bitcoind.rpc("getrawmempool")
    bitcoind.mine(1)
    await wait_until_async(lambda: srv.store.get(cid).state == "closed", timeout=30, what="closed")
    assert srv.store.get(cid).amount_sat == 20_000


async def test_a_close_exported_and_broadcast_by_hand_stops_payments(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    """The operator takes the last state out (``channel ID --close-tx``) and broadcasts it while the
    service still runs. Once the watcher sees that close spend the funding, the channel takes no
    more payments (they could never be claimed), and it is ``closed`` by that close at final depth."""
    srv = await payee_factory.start(final_confirmations=3, run_watcher=False)
    watcher = srv.app[WATCHER]
    client = payer_client
    cid = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
    bitcoind.mine(1)
    await watcher.step()
    await client.wait_open(cid, timeout=30)
    await client.pay(cid, 30_000)
    rec = srv.store.get(cid)
    payout = bytes.fromhex(rec.payout_script or "")
    exported, _ = srv.svc.channels.build(rec).build_close_at_most(payout, 2.0)  # what --close-tx prints
    txid = bitcoind.rpc("sendrawtransaction", exported.serialize().hex())
    bitcoind.mine(1)
    await watcher.step()
    await srv.svc.closer.aclose()
    with pytest.raises(ChannelError):
        await client.pay(cid, 1_000)
    assert srv.store.get(cid).amount_sat == 30_000
    bitcoind.mine(2)

    async def closed() -> bool:
        await watcher.step()
        return srv.store.get(cid).state == "closed"

    await wait_until_async(closed, timeout=30, what="closed by the exported close")
    assert srv.store.get(cid).close_txid == txid
