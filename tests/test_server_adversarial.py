"""Every adversarial request of the protocol gets the right code, and nothing is accepted."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys, script
from btcchannel.core.channel import PayerChannel
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.core.tx import OutPoint
from btcchannel.payer.client import PayerClient
from btcchannel.testing import RunningPayee
from btcchannel.testing.fixtures import PayeeFactory, PayerFactory


async def _req(
    session: aiohttp.ClientSession, method: str, url: str, data: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    body = raw if raw is not None else (json.dumps(data).encode() if data is not None else None)
    async with session.request(method, url, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


def _code(ans: tuple[int, Any]) -> tuple[int, str]:
    status, body = ans
    return status, body["error"]["code"]


def _payer_channel(client: PayerClient, cid: str) -> PayerChannel:
    rec = client.store.get(cid)
    return PayerChannel(ChannelParams.from_json(rec.params), rec.privkey, state=ChannelState.OPEN)


async def test_adversarial_payments(bitcoind: RegtestNode, payee: RunningPayee, payer_client: PayerClient) -> None:
    srv, client = payee, payer_client
    async with aiohttp.ClientSession() as s:
        deposit = 100_000
        cid = await client.open_channel(srv.url, deposit, 60, wait_open=False)
        other = await client.open_channel(srv.url, deposit, 60, wait_open=False)
        url = f"{srv.url}/v1/channels/{cid}/payments"
        # before the funding confirms: not open
        a = _payer_channel(client, cid)
        p = a.sign_payment(1000)
        assert _code(await _req(s, "POST", url, p.to_json())) == (409, "not_open")
        bitcoind.mine(1)
        await client.wait_open(cid)
        await client.wait_open(other)
        assert await client.pay(cid, amount=5000) == 5000
        good = client.store.get(cid)
        ch = _payer_channel(client, cid)
        # lower amount
        low = ch.sign_payment(4000)
        assert _code(await _req(s, "POST", url, low.to_json())) == (409, "stale_payment")
        # replay of an older payment: an old signed 1000 from before
        assert _code(await _req(s, "POST", url, p.to_json())) == (409, "stale_payment")
        # exact retry of the current one is fine
        assert (await _req(s, "POST", url, {"amount_sat": 5000, "signature": good.signature.hex()}))[0] == 200
        # bad signature (one byte flipped inside r)
        sig = bytearray(ch.sign_payment(6000).signature)
        sig[10] ^= 1
        assert _code(await _req(s, "POST", url, {"amount_sat": 6000, "signature": bytes(sig).hex()})) == (
            400,
            "bad_signature",
        )
        # garbage signature, signature with the wrong sighash byte
        assert _code(await _req(s, "POST", url, {"amount_sat": 6000, "signature": "00"})) == (400, "bad_signature")
        sig6 = ch.sign_payment(6000).signature
        assert _code(await _req(s, "POST", url, {"amount_sat": 6000, "signature": (sig6[:-1] + b"\x01").hex()})) == (
            400,
            "bad_signature",
        )
        # a valid signature of another channel
        foreign = _payer_channel(client, other).sign_payment(6000)
        assert _code(await _req(s, "POST", url, foreign.to_json())) == (400, "bad_signature")
        # beyond capacity, and into the payer's dust
        assert _code(await _req(s, "POST", url, {"amount_sat": deposit + 1, "signature": sig6.hex()})) == (
            400,
            "amount_out_of_range",
        )
        assert _code(await _req(s, "POST", url, {"amount_sat": deposit - 1, "signature": sig6.hex()})) == (
            400,
            "amount_out_of_range",
        )
        # malformed bodies
        for raw in (
            b"{",
            b"[]",
            b"null",
            b'{"amount_sat": 6000}',
            b"\xff\xfe",
            b'{"amount_sat": 6000, "signature": "ab", "extra": 1}',
            b'{"amount_sat": 6000, "amount_sat": 7000, "signature": "ab"}',
            b'{"amount_sat": NaN, "signature": "ab"}',
            b'{"amount_sat": 6000.0, "signature": "ab"}',
            b'{"amount_sat": true, "signature": "ab"}',
            b'{"amount_sat": "6000", "signature": "ab"}',
            b'{"amount_sat": 6000, "signature": "AB"}',
            b'{"amount_sat": 6000, "signature": "zz"}',
            b'{"amount_sat": -5, "signature": "ab"}',
            b'{"amount_sat": 1e400, "signature": "ab"}',
            b"[" * 100_00 + b"]" * 100_00,
        ):
            assert _code(await _req(s, "POST", url, raw=raw)) == (400, "bad_request"), raw[:40]
        # oversized body
        big = json.dumps({"amount_sat": 6000, "signature": "ab" * 40_000}).encode()
        assert _code(await _req(s, "POST", url, raw=big)) == (413, "too_large")
        # unknown channel (well-formed and malformed ids)
        for bad in ("00" * 16, "nothex", "AB" * 16):
            assert _code(await _req(s, "POST", f"{srv.url}/v1/channels/{bad}/payments", foreign.to_json())) == (
                404,
                "unknown_channel",
            )
            assert _code(await _req(s, "GET", f"{srv.url}/v1/channels/{bad}")) == (404, "unknown_channel")
        # unknown endpoint / method: JSON error, no 500
        assert (await _req(s, "GET", f"{srv.url}/v1/nothing"))[0] == 404
        assert (await _req(s, "DELETE", f"{srv.url}/v1/channels"))[0] == 405
        # close request signed by someone else
        fake = keys.sign_digest(keys.generate_private_key(), keys.close_request_digest(cid))
        assert _code(await _req(s, "POST", f"{srv.url}/v1/channels/{cid}/close", {"signature": fake.hex()})) == (
            400,
            "bad_signature",
        )
        # close request of the other channel replayed on this one
        other_close = _payer_channel(client, other).close_request_signature(other)
        assert _code(await _req(s, "POST", f"{srv.url}/v1/channels/{cid}/close", {"signature": other_close.hex()})) == (
            400,
            "bad_signature",
        )
        # nothing was accepted
        rec = srv.store.get(cid)
        assert (rec.state, rec.amount_sat, rec.signature) == ("open", 5000, good.signature)
        assert srv.store.get(other).amount_sat == 0
        # and the channel still works
        assert await client.pay(cid, 1000) == 6000


async def test_adversarial_proposals_and_funding(
    bitcoind: RegtestNode,
    funded_wallet: str,
    payee_factory: PayeeFactory,
    payer_factory: PayerFactory,
) -> None:
    payer_node = payer_factory.node()
    # a lapsed proposal frees its slot only after proposal_cooldown_s (0 here; see test_chain_bounds)
    srv = await payee_factory.start(max_proposals=3, proposal_ttl_s=3600, proposal_cooldown_s=0.0)
    async with aiohttp.ClientSession() as s:
        url = f"{srv.url}/v1/channels"
        tip = bitcoind.tip_height()
        pub = keys.public_key(keys.generate_private_key())
        pscript = script.address_to_script(bitcoind.new_address(funded_wallet), "regtest")
        ok = {
            "payer_pubkey": pub.hex(),
            "deposit_sat": 50_000,
            "expiry_height": tip + 50,
            "payer_script": pscript.hex(),
        }
        assert _code(await _req(s, "POST", url, {**ok, "payer_pubkey": "02" + "00" * 32})) == (400, "bad_pubkey")
        assert _code(await _req(s, "POST", url, {**ok, "payer_script": "6a00"})) == (400, "bad_script")
        assert _code(await _req(s, "POST", url, {**ok, "deposit_sat": 10})) == (400, "deposit_out_of_range")
        assert _code(await _req(s, "POST", url, {**ok, "deposit_sat": 10**12})) == (400, "deposit_out_of_range")
        assert _code(await _req(s, "POST", url, {**ok, "expiry_height": tip + 1})) == (400, "expiry_out_of_range")
        assert _code(await _req(s, "POST", url, {**ok, "expiry_height": tip + 10**6})) == (400, "expiry_out_of_range")
        assert _code(await _req(s, "POST", url, {**ok, "extra": 1})) == (400, "bad_request")
        assert srv.store.list() == []
        ids = []
        for _ in range(3):
            st, ans = await _req(s, "POST", url, ok)
            assert st == 201
            ids.append(ans["channel_id"])
        assert _code(await _req(s, "POST", url, ok)) == (503, "too_many_channels")
        # funding: unknown outpoint, wrong script/amount
        furl = f"{url}/{ids[0]}/funding"
        assert _code(await _req(s, "POST", furl, {"txid": "11" * 32, "vout": 0})) == (404, "funding_not_found")
        txid = bitcoind.send(funded_wallet, bitcoind.new_address(funded_wallet), 50_000)
        tx = bitcoind.rpc("getrawtransaction", txid, True)
        vout = next(o["n"] for o in tx["vout"] if round(o["value"] * 1e8) == 50_000)
        assert _code(await _req(s, "POST", furl, {"txid": txid, "vout": vout})) == (400, "funding_mismatch")
        assert _code(await _req(s, "POST", furl, {"txid": txid.upper(), "vout": vout})) == (400, "bad_request")
        assert _code(await _req(s, "POST", furl, {"txid": txid, "vout": -1})) == (400, "bad_request")
        # wrong amount to the right script
        params = ChannelParams.from_json(srv.store.get(ids[0]).params)
        wrong = await payer_node.fund_output(params.funding_script, 49_999)
        assert _code(await _req(s, "POST", furl, {"txid": wrong.txid, "vout": wrong.vout})) == (400, "funding_mismatch")
        assert srv.store.get(ids[0]).state == "proposed"
        # proposals lapse, which frees the cap
        srv.store._db.execute("UPDATE channels SET lapse_at=0 WHERE channel_id=?", (ids[1],))
        st, _ = await _req(s, "POST", url, ok)
        assert st == 201
        assert srv.store.get(ids[1]).state == "failed" and srv.store.get(ids[1]).end_reason == "lapsed"
        right = await payer_node.fund_output(params.funding_script, 50_000)
        assert _code(await _req(s, "POST", f"{url}/{ids[1]}/funding", {"txid": right.txid, "vout": right.vout})) == (
            409,
            "channel_closed",
        )
        st, obj = await _req(s, "POST", furl, {"txid": right.txid, "vout": right.vout})
        assert st == 200 and obj["state"] == "funding" and obj["funding_txid"] == right.txid
        # a retry is idempotent; another outpoint is refused
        assert (await _req(s, "POST", furl, {"txid": right.txid, "vout": right.vout}))[0] == 200
        assert _code(await _req(s, "POST", furl, {"txid": wrong.txid, "vout": wrong.vout})) == (400, "funding_mismatch")
        info = (await _req(s, "GET", f"{srv.url}/v1/info"))[1]
        assert info["network"] == "regtest" and info["version"] == 1
        assert OutPoint(right.txid, right.vout) == right
