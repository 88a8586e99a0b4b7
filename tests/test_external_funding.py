"""Funding a channel from any wallet (``open --psbt``, ``open --funding-tx``) on a real regtest node.

The node's wallet the payer names is watch-only (the public descriptors of another wallet, as a
hardware wallet's are); a separate Bitcoin Core wallet holding the keys signs the printed PSBT as an
external signer would, and the signed transaction comes back through ``--funding-tx`` or is seen in a
block. The channel then opens and pays.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from btcchannel.amounts import btc_to_sat
from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.errors import BadRequest, ChannelClosed
from btcchannel.payer.client import PayerClient
from btcchannel.payer.external import fund_with_tx, funding_outpoint, funding_request
from btcchannel.testing import RunningPayee
from btcchannel.testing.cli import CliProcess
from btcchannel.wait import wait_until

_numbers = itertools.count()


def _watch_only_of(bitcoind: RegtestNode, signer: str) -> str:
    """A watch-only descriptor wallet of ``signer``'s public descriptors (how a hardware wallet is watched)."""
    name = f"watch{next(_numbers)}"
    bitcoind.rpc("createwallet", name, True, True)  # private keys disabled, blank
    public = bitcoind.rpc("listdescriptors", wallet=signer)["descriptors"]
    requests = [
        {
            "desc": d["desc"],
            "timestamp": 0,
            "active": d["active"],
            "internal": d.get("internal", False),
            **({"range": d["range"], "next_index": d.get("next", 0)} if "range" in d else {}),
        }
        for d in public
    ]
    assert all(r["success"] for r in bitcoind.rpc("importdescriptors", requests, wallet=name))
    assert bitcoind.rpc("getwalletinfo", wallet=name)["private_keys_enabled"] is False
    return name


def _sign_externally(bitcoind: RegtestNode, signer: str, psbt: str) -> str:
    """What an external signer does with the PSBT: sign, finalize, hand back the transaction."""
    signed = bitcoind.rpc("walletprocesspsbt", psbt, True, "ALL", wallet=signer)
    assert signed["complete"]
    final = bitcoind.rpc("finalizepsbt", signed["psbt"])
    assert final["complete"]
    return str(final["hex"])


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _open_state(payee: CliProcess, cid: str) -> bool:
    return bool(payee.json("channel", cid)["state"] == "open")


def test_psbt_signed_by_an_external_wallet_opens_and_pays(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    payee, _, url = payee_process
    watch = _watch_only_of(bitcoind, funded_wallet)
    payer = CliProcess(bitcoind, tmp_path / "payer", watch)
    refund_to = bitcoind.new_address(funded_wallet)
    done = payer.run(
        "--json",
        "open",
        url,
        "--deposit-sat",
        "150000",
        "--lifetime-blocks",
        "30",
        "--psbt",
        "--no-wait",
        "--refund-address",
        refund_to,
    )
    assert done.returncode == 0, done.stderr
    request, proposed = _lines(done.stdout)
    cid = request["channel_id"]
    assert proposed["channel_id"] == cid and proposed["state"] == "proposed"
    assert request["amount_sat"] == 150_000 and request["amount_btc"] == "0.00150000" and request["psbt"]
    assert bitcoind.rpc("deriveaddresses", request["descriptor"]) == [request["funding_address"]]
    decoded = bitcoind.rpc("decodepsbt", request["psbt"])
    outs = [(o["scriptPubKey"]["address"], btc_to_sat(o["value"])) for o in decoded["tx"]["vout"]]
    assert (request["funding_address"], 150_000) in outs
    assert all("final_scriptwitness" not in i and "partial_signatures" not in i for i in decoded["inputs"])

    # a transaction that does not pay exactly the deposit is refused and not broadcast
    wrong = bitcoind.rpc(
        "walletcreatefundedpsbt", [], [{request["funding_address"]: "0.00149999"}], wallet=funded_wallet
    )
    wrong_hex = _sign_externally(bitcoind, funded_wallet, wrong["psbt"])
    err = payer.error("open", url, "--funding-tx", wrong_hex)
    assert err["code"] == "funding_mismatch", err
    wrong_txid = bitcoind.rpc("decoderawtransaction", wrong_hex)["txid"]
    assert wrong_txid not in bitcoind.rpc("getrawmempool")

    tx_hex = _sign_externally(bitcoind, funded_wallet, request["psbt"])
    registered = payer.json("open", url, "--funding-tx", tx_hex, "--no-wait")
    txid = bitcoind.rpc("decoderawtransaction", tx_hex)["txid"]
    assert registered["channel_id"] == cid and registered["funding_txid"] == txid
    assert txid in bitcoind.rpc("getrawmempool")
    bitcoind.mine(1)
    wait_until(lambda: _open_state(payee, cid), timeout=30, what="the payee to call the channel open")
    paid = payer.json("fetch", f"{url}/v1/file/0", "--channel", cid)  # one metered unit of 2000 sat
    assert paid["amount_sat"] == 2000 and paid["remaining_sat"] == 148_000
    listed = {c["channel_id"]: c for c in payer.json("list")["channels"]}
    assert listed[cid]["state"] == "open" and listed[cid]["funding_txid"] == txid


def test_open_psbt_waits_for_the_funding_in_a_block(
    bitcoind: RegtestNode,
    funded_wallet: str,
    tmp_path: Path,
    payee_process: tuple[CliProcess, subprocess.Popen[str], str],
) -> None:
    _, _, url = payee_process
    watch = _watch_only_of(bitcoind, funded_wallet)
    payer = CliProcess(bitcoind, tmp_path / "payer", watch)
    proc = subprocess.Popen(
        payer.argv(
            "--json",
            "open",
            url,
            "--deposit-sat",
            "120000",
            "--lifetime-blocks",
            "30",
            "--psbt",
            "--refund-address",
            bitcoind.new_address(funded_wallet),
            "--timeout",
            "60",
        ),
        env=payer.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.stderr.read() if proc.stderr else ""
        request = json.loads(first)
        txid = bitcoind.rpc("sendrawtransaction", _sign_externally(bitcoind, funded_wallet, request["psbt"]))
        bitcoind.mine(1)  # broadcast by the external wallet itself: the payer sees it in a block
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0, err
    [opened] = _lines(out)
    assert opened["channel_id"] == request["channel_id"] and opened["state"] == "open"
    assert opened["funding_txid"] == txid


async def test_a_funding_tx_for_a_proposal_the_payee_dropped_is_not_broadcast(
    bitcoind: RegtestNode,
    payee: RunningPayee,
    payer_client: PayerClient,
    funded_wallet: str,
) -> None:
    payer_client.stateless_proposals = False  # a proposal the payee stores (and can drop)
    cid = await payer_client.propose(payee.url, 100_000, 20)
    request = await funding_request(payer_client, cid)
    assert request["psbt"] is not None  # the payer's own node wallet can fund it
    tx_hex = _sign_externally(
        bitcoind,
        funded_wallet,
        bitcoind.rpc(
            "walletcreatefundedpsbt", [], [{request["funding_address"]: request["amount_btc"]}], wallet=funded_wallet
        )["psbt"],
    )
    assert funding_outpoint(ChannelParams.from_json(payer_client.store.get(cid).params), tx_hex).vout in (0, 1)
    await payer_client.close(cid)  # a close request on a proposal cancels it
    with pytest.raises(BadRequest, match="failed"):  # known here already
        await fund_with_tx(payer_client, cid, tx_hex)
    # as after a lapse the payer did not hear of: its row still says proposed, the payee's does not
    payer_client.store.set_state(cid, ChannelState.PROPOSED)
    with pytest.raises(ChannelClosed):
        await fund_with_tx(payer_client, cid, tx_hex)
    assert bitcoind.rpc("decoderawtransaction", tx_hex)["txid"] not in bitcoind.rpc("getrawmempool")
    with pytest.raises(BadRequest):
        funding_outpoint(ChannelParams.from_json(payer_client.store.get(cid).params), "00ff")
