"""Stateless proposals on a real regtest node over real sockets: a flood of them stores and reserves
nothing and locks no one out; forged, altered, foreign, expired and replayed tokens are refused with
their codes; the token's agreed terms hold whatever the payee's configuration became; a payer that
crashed between its funding and its report reports again; two payee instances on one PostgreSQL
database racing one report write one channel; a proposal without ``stateless`` is stored as before."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiohttp
import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys, script
from btcchannel.core.params import ChannelParams
from btcchannel.core.proposal import ProposalToken
from btcchannel.core.seed import derive_stateless_key, proposal_mac_key
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import Terms
from btcchannel.core.tx import OutPoint
from btcchannel.errors import ChannelClosed
from btcchannel.payer.client import PayerClient
from btcchannel.payer.external import fund_with_tx
from btcchannel.testing import RunningPayee, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory

DEPOSIT = 50_000


def _proposal(bitcoind: RegtestNode, *, stateless: bool | None = True, **kw: Any) -> dict[str, Any]:
    pub = keys.public_key(keys.generate_private_key())
    body: dict[str, Any] = {
        "payer_pubkey": pub.hex(),
        "deposit_sat": DEPOSIT,
        "expiry_height": bitcoind.tip_height() + 50,
        "payer_script": script.p2wpkh_script(pub).hex(),
    }
    if stateless is not None:
        body["stateless"] = stateless
    body.update(kw)
    return body


async def _call(
    url: str, method: str, path: str, body: dict[str, Any] | None = None, source: str = "127.0.0.1"
) -> tuple[int, Any]:
    """One request from the local address ``source`` on a fresh connection: (status, JSON body)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as s:
        async with s.request(method, f"{url}{path}", json=body) as resp:
            return resp.status, await resp.json()


def _code(answer: tuple[int, Any]) -> tuple[int, str]:
    status, body = answer
    return status, body["error"]["code"]


def _raw_db(srv: RunningPayee) -> sqlite3.Connection:
    return sqlite3.connect(srv.config.db_path)


def _store_changes(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(``PRAGMA data_version``: moves whenever another connection commits to the file, the channel
    rows, the seed's next key index)."""
    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
    rows = int(conn.execute("SELECT COUNT(*) FROM channels").fetchone()[0])
    index = conn.execute("SELECT next_index FROM seed WHERE id=1").fetchone()
    return version, rows, int(index[0]) if index else -1


async def test_a_stateless_flood_stores_nothing_and_locks_no_one_out(
    bitcoind: RegtestNode, payee_factory: PayeeFactory, payer_factory: PayerFactory
) -> None:
    srv = await payee_factory.start(max_proposals=4, max_proposals_per_client=2, proposal_grace_s=600)
    info = (await _call(srv.url, "GET", "/v1/info"))[1]
    assert info["stateless_proposals"] is True
    # the old lever: stored proposals from a few addresses fill every cap
    for source in ("127.0.0.2", "127.0.0.3"):
        for _ in range(2):
            assert (await _call(srv.url, "POST", "/v1/channels", _proposal(bitcoind, stateless=None), source))[0] == 201
    assert _code(await _call(srv.url, "POST", "/v1/channels", _proposal(bitcoind, stateless=False), "127.0.0.4")) == (
        503,
        "too_many_channels",
    )
    conn = _raw_db(srv)
    try:
        before = _store_changes(conn)
        assert before[1:] == (4, 4)  # four stored proposals, four key indexes reserved
        started = time.perf_counter()

        async def flood(source: str) -> list[str]:
            out = []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as s:
                for _ in range(40):
                    async with s.post(f"{srv.url}/v1/channels", json=_proposal(bitcoind)) as resp:
                        assert resp.status == 201, await resp.text()
                        ans = await resp.json()
                        assert isinstance(ans["proposal_token"], str)
                        out.append(ans["channel_id"])
            return out

        ids = [cid for batch in await asyncio.gather(*(flood(f"127.0.1.{i}") for i in range(10))) for cid in batch]
        elapsed = time.perf_counter() - started
        assert len(set(ids)) == 400
        assert _store_changes(conn) == before  # not one commit: no row, no key index
    finally:
        conn.close()
    print(f"400 stateless proposals from 10 addresses in {elapsed:.2f} s, nothing written")
    # the payee knows none of them
    assert _code(await _call(srv.url, "GET", f"/v1/channels/{ids[0]}")) == (404, "unknown_channel")
    sig = "30" * 8
    assert _code(await _call(srv.url, "POST", f"/v1/channels/{ids[0]}/close", {"signature": sig})) == (
        404,
        "unknown_channel",
    )
    # a new client (from the flooders' own address, even) opens, funds and pays
    client = payer_factory("newcomer")
    cid = await client.open_channel(srv.url, 60_000, 30, wait_open=False)
    assert srv.store.get(cid).state is ChannelState.FUNDING
    bitcoind.mine(1)
    await client.wait_open(cid, timeout=30)
    for _ in range(3):
        await client.pay(cid, 1_000)
    rec = srv.store.get(cid)
    assert rec.amount_sat == 3_000 and rec.key_index is None and srv.store.next_key_index() == 4
    assert rec.privkey == derive_stateless_key(srv.store.seed(), cid)
    assert srv.store.count_proposals() == 4  # the stored ones, untouched


async def test_forged_altered_foreign_expired_and_replayed_tokens_are_refused(
    bitcoind: RegtestNode, payee_factory: PayeeFactory, payer_factory: PayerFactory
) -> None:
    srv = await payee_factory.start(proposal_ttl_s=600)
    other = await payee_factory.start(payee_factory.config("other"))  # another payee: another seed
    node = payer_factory.node()
    body = _proposal(bitcoind)
    status, ans = await _call(srv.url, "POST", "/v1/channels", body)
    assert status == 201
    cid, token = ans["channel_id"], ans["proposal_token"]
    seed = srv.store.seed()
    assert ans["payee_pubkey"] == keys.public_key(derive_stateless_key(seed, cid)).hex()
    outpoint = await node.fund_output(bytes.fromhex(ans["funding_script"]), DEPOSIT)
    report = {"txid": outpoint.txid, "vout": outpoint.vout}

    async def fund(channel_id: str, **extra: Any) -> tuple[int, Any]:
        return await _call(srv.url, "POST", f"/v1/channels/{channel_id}/funding", {**report, **extra})

    assert _code(await fund(cid)) == (404, "unknown_channel")  # without its token: nothing to fund
    middle = len(token) // 2
    altered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    assert _code(await fund(cid, proposal_token=altered)) == (400, "bad_proposal_token")
    assert _code(await fund(cid, proposal_token=token[:-4])) == (400, "bad_proposal_token")
    assert _code(await fund(cid, proposal_token=token + "A")) == (400, "bad_proposal_token")
    assert _code(await fund(cid, proposal_token=12)) == (400, "bad_proposal_token")
    assert _code(await fund(cid, proposal_token=None)) == (400, "bad_proposal_token")
    foreign = (await _call(other.url, "POST", "/v1/channels", body))[1]
    assert _code(await fund(foreign["channel_id"], proposal_token=foreign["proposal_token"])) == (
        400,
        "bad_proposal_token",
    )
    own = ProposalToken.decode(token, proposal_mac_key(seed), "regtest")
    assert own.channel_id == cid and own.deposit_sat == DEPOSIT and own.payer_script.hex() == body["payer_script"]
    forged = ProposalToken(**{**own.__dict__, "deposit_sat": 1_000}).encode(b"\x00" * 32, "regtest")
    assert _code(await fund(cid, proposal_token=forged)) == (400, "bad_proposal_token")
    second = (await _call(srv.url, "POST", "/v1/channels", _proposal(bitcoind)))[1]
    assert _code(await fund(second["channel_id"], proposal_token=token)) == (400, "bad_proposal_token")  # not its id
    # issued by this payee (its own key), but longer ago than proposal_ttl_s: lapsed
    expired = ProposalToken(**{**own.__dict__, "issued_at": int(time.time()) - 700}).encode(
        proposal_mac_key(seed), "regtest"
    )
    assert _code(await fund(cid, proposal_token=expired)) == (409, "channel_closed")
    assert srv.store.find(cid) is None  # nothing refused wrote anything
    # the real token: the channel's row, written now; the same report again is the same answer
    status, obj = await fund(cid, proposal_token=token)
    assert status == 200 and obj["state"] == "funding" and obj["funding_txid"] == outpoint.txid
    assert await fund(cid, proposal_token=token) == (200, obj)
    assert await fund(cid, proposal_token=expired) == (200, obj)  # a funded channel's retry: not lapsed
    assert await fund(cid) == (200, obj)  # (and without its token, as any stored channel)
    # the token replayed with another outpoint paying the same script: refused
    again = await node.fund_output(bytes.fromhex(ans["funding_script"]), DEPOSIT)
    replay = {"txid": again.txid, "vout": again.vout, "proposal_token": token}
    assert _code(await _call(srv.url, "POST", f"/v1/channels/{cid}/funding", replay)) == (400, "funding_mismatch")
    rec = srv.store.get(cid)
    assert (rec.funding_txid, rec.funding_vout) == (outpoint.txid, outpoint.vout) and len(srv.store.list()) == 1
    assert rec.created_height == own.created_height and rec.client == "127.0.0.1"


async def test_the_tokens_agreed_terms_hold_when_the_payee_changes_its_own(
    bitcoind: RegtestNode, payee_factory: PayeeFactory, payer_factory: PayerFactory
) -> None:
    first = await payee_factory.start(payee_factory.config("payee", price_sat=0))
    terms = Terms(max_total_sat=20_000).to_json()
    status, ans = await _call(first.url, "POST", "/v1/channels", _proposal(bitcoind, terms=terms))
    assert status == 201 and ans["terms"] == terms
    await first.stop()
    later = await payee_factory.start(payee_factory.config("payee", price_sat=7, mode="postpay"))  # same seed
    assert (await _call(later.url, "GET", "/v1/info"))[1]["terms"]["price_sat"] == 7
    outpoint = await payer_factory.node().fund_output(bytes.fromhex(ans["funding_script"]), DEPOSIT)
    report = {"txid": outpoint.txid, "vout": outpoint.vout, "proposal_token": ans["proposal_token"]}
    status, obj = await _call(later.url, "POST", f"/v1/channels/{ans['channel_id']}/funding", report)
    assert status == 200 and obj["terms"] == terms  # agreed: price 0, prepay, whatever the payee says now
    assert later.store.get(ans["channel_id"]).terms == terms


async def test_a_payer_that_crashed_before_its_report_reports_again(
    bitcoind: RegtestNode, payee: RunningPayee, payer_factory: PayerFactory
) -> None:
    client = payer_factory("payer")
    cid = await client.propose(payee.url, 80_000, 30)
    rec = client.store.get(cid)
    assert rec.proposal_token is not None and rec.proposal_expires_at is not None
    assert rec.proposal_expires_at <= time.time() + payee.config.proposal_ttl_s
    assert payee.store.find(cid) is None
    assert (await client.status(cid))["state"] == "proposed"  # the payee knows nothing: the local view
    outpoint = await client.node.fund_output(ChannelParams.from_json(rec.params).funding_script, 80_000)
    client.record_funding(cid, outpoint)
    await client.aclose()  # killed between the broadcast and the report
    assert payee.store.find(cid) is None
    again = payer_factory("payer")  # the same datadir, restarted
    assert await again.refresh() == bitcoind.tip_height()  # the payee's unknown_channel fails nothing
    obj = await again.resume(cid)  # the report again, with the stored token
    assert obj["state"] == "funding" and obj["funding_txid"] == outpoint.txid
    assert payee.store.get(cid).funding_txid == outpoint.txid
    assert (await again.register_funding(cid))["funding_txid"] == outpoint.txid  # and once more: the same
    bitcoind.mine(1)
    await again.wait_open(cid, timeout=30)
    assert await again.pay(cid, 2_000) == 2_000
    # an unfunded stateless proposal: listed, refreshed, cancelled here alone, lapsed on the payer's clock
    spare = await again.propose(payee.url, 30_000, 30)
    await again.refresh()
    assert again.store.get(spare).state is ChannelState.PROPOSED
    obj = await again.close(spare)
    assert obj["state"] == "failed" and obj["end_reason"] == "cancelled_by_payer"
    assert again.store.get(spare).state is ChannelState.FAILED and payee.store.find(spare) is None
    late = await again.propose(payee.url, 30_000, 30)
    again.store._db.execute("UPDATE channels SET proposal_expires_at=? WHERE channel_id=?", (time.time() - 1, late))
    obj = await again.status(late)
    assert obj["state"] == "failed" and obj["end_reason"] == "lapsed"


async def test_an_external_funding_of_a_lapsed_stateless_proposal_is_not_broadcast(
    bitcoind: RegtestNode, payee: RunningPayee, payer_client: PayerClient
) -> None:
    cid = await payer_client.propose(payee.url, 40_000, 30)
    params = ChannelParams.from_json(payer_client.store.get(cid).params)
    node = payer_client.node
    unsigned = await node.call(
        "walletcreatefundedpsbt", [], [{params.funding_address: 0.0004}], 0, {}, True, wallet=node.wallet
    )
    signed = await node.call("walletprocesspsbt", unsigned["psbt"], True, "ALL", wallet=node.wallet)
    tx_hex = (await node.call("finalizepsbt", signed["psbt"]))["hex"]
    payer_client.store._db.execute(
        "UPDATE channels SET proposal_expires_at=? WHERE channel_id=?", (time.time() - 1, cid)
    )
    with pytest.raises(ChannelClosed):
        await fund_with_tx(payer_client, cid, tx_hex)
    assert bitcoind.rpc("decoderawtransaction", tx_hex)["txid"] not in bitcoind.rpc("getrawmempool")
    fresh = await payer_client.propose(payee.url, 40_000, 30)  # in time: broadcast, registered, opens
    params = ChannelParams.from_json(payer_client.store.get(fresh).params)
    unsigned = await node.call(
        "walletcreatefundedpsbt", [], [{params.funding_address: 0.0004}], 0, {}, True, wallet=node.wallet
    )
    signed = await node.call("walletprocesspsbt", unsigned["psbt"], True, "ALL", wallet=node.wallet)
    outpoint = await fund_with_tx(payer_client, fresh, (await node.call("finalizepsbt", signed["psbt"]))["hex"])
    assert payee.store.get(fresh).funding_txid == outpoint.txid


async def test_old_style_proposals_are_stored_as_before(
    bitcoind: RegtestNode, payee: RunningPayee, payer_factory: PayerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, ans = await _call(payee.url, "POST", "/v1/channels", _proposal(bitcoind, stateless=None))
    assert status == 201 and "proposal_token" not in ans
    rec = payee.store.get(ans["channel_id"])
    assert rec.state is ChannelState.PROPOSED and rec.key_index is not None and rec.lapse_at is not None
    assert _code(await _call(payee.url, "POST", "/v1/channels", _proposal(bitcoind, stateless="yes"))) == (
        400,
        "bad_request",
    )
    client = payer_factory("old")
    client.stateless_proposals = False  # as a payer from before stateless proposals
    cid = await client.propose(payee.url, 30_000, 30)
    assert client.store.get(cid).proposal_token is None
    assert payee.store.get(cid).state is ChannelState.PROPOSED and payee.store.count_proposals() == 2
    # a new payer never asks a payee that does not offer them (an older one refuses unknown fields)
    info = payee.svc.info
    monkeypatch.setattr(payee.svc, "info", lambda: {k: v for k, v in info().items() if k != "stateless_proposals"})
    new = payer_factory("new")
    cid = await new.propose(payee.url, 30_000, 30)
    assert new.store.get(cid).proposal_token is None and payee.store.get(cid).state is ChannelState.PROPOSED


async def test_two_payee_instances_on_postgresql_write_one_channel(
    bitcoind: RegtestNode, payee_factory: PayeeFactory, payer_factory: PayerFactory, postgres_url: str
) -> None:
    a = await payee_factory.start(payee_factory.config("a", store_url=postgres_url))
    b = await payee_factory.start(payee_factory.config("b", store_url=postgres_url))
    status, ans = await _call(a.url, "POST", "/v1/channels", _proposal(bitcoind))
    assert status == 201
    cid = ans["channel_id"]
    outpoint: OutPoint = await payer_factory.node().fund_output(bytes.fromhex(ans["funding_script"]), DEPOSIT)
    report = {"txid": outpoint.txid, "vout": outpoint.vout, "proposal_token": ans["proposal_token"]}
    answers = await asyncio.gather(
        *(_call(srv.url, "POST", f"/v1/channels/{cid}/funding", report) for srv in (a, b, a, b))
    )
    assert {status for status, _ in answers} == {200}
    assert len({str(sorted(obj.items())) for _, obj in answers}) == 1  # one channel, the same answer
    assert [r.channel_id for r in a.store.list()] == [cid]
    bitcoind.mine(1)
    await wait_until_async(lambda: b.store.get(cid).state is ChannelState.OPEN, timeout=30, what="open")
