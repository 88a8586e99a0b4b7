"""A close of several channels in one transaction (the core's build_multi_close) on a real node:
accepted, confirmed, every payer's change exact, one payee output with the sum minus the fee."""

from __future__ import annotations

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.channel import build_multi_close
from btcchannel.core.script import address_to_script
from btcchannel.testing.closes import close_summary, fund_channels

DEPOSIT = 200_000


def test_one_transaction_closes_ten_channels_with_every_exact_amount(bitcoind: RegtestNode) -> None:
    amounts = [10_000 + 1_337 * i for i in range(10)]
    pairs = fund_channels(bitcoind, amounts, DEPOSIT)
    payee_script = address_to_script(bitcoind.new_address("miner"), "regtest")
    tx = build_multi_close([p.payee for p in pairs], payee_script, 2.0)
    txid = bitcoind.rpc("sendrawtransaction", tx.serialize().hex())
    bitcoind.mine(1)
    close = close_summary(bitcoind, txid)
    assert [tuple(i) for i in close["inputs"]] == [
        (p.payee.params.funding.txid, p.payee.params.funding.vout) for p in pairs if p.payee.params.funding is not None
    ]
    assert close["outputs"][:10] == [DEPOSIT - a for a in amounts]  # input i pairs with its payer's change
    assert close["outputs"][10] == sum(amounts) - close["fee_sat"]  # one payee output
    assert len(close["outputs"]) == 11
    assert 2 * close["vsize"] <= close["fee_sat"] < 3 * close["vsize"]
