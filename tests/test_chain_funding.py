"""Funding depth and validity on a real regtest node: no 0-conf, no coinbase, and a funding that
leaves the active chain (a reorg, a double-spend) takes the channel out of ``open`` at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.cli import main
from btcchannel.core import keys, script
from btcchannel.errors import FundingMismatch, NotOpen
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.http import WATCHER
from btcchannel.payee.metered import add_file_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.testing import RunningPayee, open_channel, sats, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


def test_zero_confirmations_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="min_confirmations"):
        ServerConfig(datadir=tmp_path, min_confirmations=0)
    with pytest.raises(ValueError, match="final_confirmations"):
        ServerConfig(datadir=tmp_path, final_confirmations=0)
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "serve", "--min-confirmations", "0"])
    assert out.exit_code == 2 and "min-confirmations" in out.output
    assert not (tmp_path / "payee.db").exists()  # refused before anything started


def _block_of(bitcoind: RegtestNode, txid: str) -> str:
    return str(bitcoind.transaction(txid)["blockhash"])


async def _state(srv: RunningPayee, cid: str, state: str) -> None:
    await wait_until_async(lambda: srv.store.get(cid).state == state, timeout=30, what=f"channel {state}")


async def test_coinbase_funding_refused(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(max_deposit_sat=50 * 100_000_000)
    # the subsidy of the next block: that of an empty block mined now, unless a halving falls between
    addr = bitcoind.new_address("miner")
    if (bitcoind.tip_height() + 2) % 150 < 2:
        bitcoind.mine(2)
    bitcoind.rpc("generateblock", addr, [])
    subsidy = sats(bitcoind.rpc("getblock", bitcoind.rpc("getbestblockhash"), 2)["tx"][0]["vout"][0]["value"])
    payer_priv = keys.generate_private_key()
    payer_script = script.address_to_script(bitcoind.new_address("miner"), "regtest")
    _, ans = await payer_client.request(
        "POST",
        f"{srv.url}/v1/channels",
        {
            "payer_pubkey": keys.public_key(payer_priv).hex(),
            "deposit_sat": subsidy,
            "expiry_height": bitcoind.tip_height() + 60,
            "payer_script": payer_script.hex(),
        },
    )
    cid = ans["channel_id"]
    # a block whose coinbase pays exactly the deposit to the funding address
    block = bitcoind.rpc("generateblock", ans["funding_address"], [])["hash"]
    coinbase = bitcoind.rpc("getblock", block, 2)["tx"][0]
    assert sats(coinbase["vout"][0]["value"]) == subsidy
    with pytest.raises(FundingMismatch, match="coinbase"):
        await payer_client.request(
            "POST", f"{srv.url}/v1/channels/{cid}/funding", {"txid": coinbase["txid"], "vout": 0}
        )
    assert srv.store.get(cid).state == "proposed"


async def test_funding_reorged_out_refuses_payments_and_prepaid_units_until_back(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
    tmp_path: Path,
) -> None:
    """One block confirms two fundings, a plain payee's and a prepaying one's; while it is out of
    the chain both channels are back in ``funding``: payments and prepaid units are refused."""
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 4)
    srv = await payee_factory.start()
    units = await payee_factory.start(
        name="prepay", hook=lambda app: add_file_route(app, data, chunk_size=100), price_sat=100, mode="prepay"
    )
    client = payer_client
    cid = await client.open_channel(srv.url, 100_000, 60, wait_open=False)
    units_cid = await client.open_channel(units.url, 100_000, 60, wait_open=False)
    bitcoind.mine(1)
    await client.wait_open(cid)
    await client.wait_open(units_cid)
    await client.pay(cid, 10_000)
    metered = MeteredPayer(client, units_cid)
    assert (await metered.fetch(f"{units.url}/v1/file/0"))[0] == 200
    funding = srv.store.get(cid).funding_txid
    units_funding = units.store.get(units_cid).funding_txid
    assert funding is not None and units_funding is not None
    block = _block_of(bitcoind, funding)
    assert _block_of(bitcoind, units_funding) == block
    bitcoind.rpc("invalidateblock", block)  # the block that confirmed the fundings leaves the chain
    assert {funding, units_funding} <= set(bitcoind.rpc("getrawmempool"))
    await _state(srv, cid, "funding")
    await _state(units, units_cid, "funding")
    with pytest.raises(NotOpen):
        await client.pay(cid, 5_000)
    assert srv.store.get(cid).amount_sat == 10_000
    with pytest.raises(NotOpen):
        await metered.fetch(f"{units.url}/v1/file/1")
    assert (units.store.get(units_cid).amount_sat, units.store.get(units_cid).units) == (100, 1)
    bitcoind.rpc("reconsiderblock", block)
    await _state(srv, cid, "open")
    await _state(units, units_cid, "open")
    assert await client.pay(cid, 5_000) >= 15_000
    assert srv.store.get(cid).amount_sat >= 15_000


async def test_funding_reorged_out_and_double_spent_fails_at_final_depth(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(final_confirmations=3)
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000, 60)
    await client.pay(cid, 10_000)
    funding = srv.store.get(cid).funding_txid
    assert funding is not None
    bitcoind.rpc("invalidateblock", _block_of(bitcoind, funding))
    conflict: Any = bitcoind.rpc("bumpfee", funding, wallet=funded_wallet)["txid"]
    await _state(srv, cid, "funding")
    with pytest.raises(NotOpen):
        await client.pay(cid, 5_000)
    bitcoind.mine(2)  # the conflict is buried, not yet at final depth: not final
    await wait_until_async(
        lambda: bitcoind.transaction(conflict).get("confirmations") == 2, timeout=30, what="conflict at depth 2"
    )
    await srv.app[WATCHER].step()  # a full pass at depth 2
    assert srv.store.get(cid).state == "funding"
    bitcoind.mine(1)
    await _state(srv, cid, "failed")
    rec = srv.store.get(cid)
    assert rec.exception_txid == conflict and rec.end_reason == "funding_double_spent"
