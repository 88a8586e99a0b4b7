"""The wire protocol holds up for other implementations: whole bodies whatever their framing (two TCP
writes, chunked), ``too_large`` for every framing, bounded numbers (huge literals are ``bad_request``,
never a 500), ``expiry_out_of_range`` for a timestamp, exact retries across two payee processes,
and a small fuzz of the endpoints' bodies that never gets a 500."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core.keys import generate_private_key, public_key
from btcchannel.payer.client import PayerClient
from btcchannel.testing import open_channel
from btcchannel.testing.fixtures import PayeeFactory
from btcchannel.wire import MAX_BODY


async def _raw(url: str, head: str, *parts: bytes, gap_s: float = 0.0) -> tuple[int, Any]:
    """One HTTP/1.1 request over a raw socket: ``head`` (request line and headers), then ``parts``
    written separately, ``gap_s`` apart; returns (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
        for i, part in enumerate(parts):
            if i and gap_s:
                await writer.drain()
                await asyncio.sleep(gap_s)  # the separate TCP write under test
            writer.write(part)
        await writer.drain()
        status_line = await reader.readline()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return int(status_line.split()[1]), json.loads(body) if body else None
    finally:
        writer.close()


def _head(method: str, path: str, host: str, **headers: str | int) -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


async def test_bodies_whatever_their_framing(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start()
    client = payer_client
    cid = await open_channel(client, bitcoind, srv.url, 100_000)
    host = srv.url.removeprefix("http://")
    path = f"/v1/channels/{cid}/payments"
    # a correctly signed payment whose body arrives in two TCP writes 50 ms apart
    p1 = await client.sign_next(cid, 1_000)
    body = json.dumps(p1.to_json()).encode()
    status, ans = await _raw(
        srv.url, _head("POST", path, host, Content_Length=len(body)), body[:20], body[20:], gap_s=0.05
    )
    assert (status, ans["amount_sat"]) == (200, 1_000)
    # the same with chunked framing, the chunks 50 ms apart
    p2 = await client.sign_next(cid, 2_000)
    body = json.dumps(p2.to_json()).encode()
    status, ans = await _raw(
        srv.url,
        _head("POST", path, host, Transfer_Encoding="chunked"),
        b"%x\r\n%s\r\n" % (17, body[:17]),
        _chunked(body[17:]),
        gap_s=0.05,
    )
    assert (status, ans["amount_sat"]) == (200, 2_000)
    # over 64 KiB: too_large for a length and for chunks, even when each chunk is small
    big = b'{"amount_sat": 3000, "signature": "' + b"00" * MAX_BODY + b'"}'
    status, ans = await _raw(srv.url, _head("POST", path, host, Content_Length=len(big)), big)
    assert (status, ans["error"]["code"]) == (413, "too_large")
    pieces = [big[i : i + 4096] for i in range(0, len(big), 4096)]
    status, ans = await _raw(srv.url, _head("POST", path, host, Transfer_Encoding="chunked"), _chunked(*pieces))
    assert (status, ans["error"]["code"]) == (413, "too_large")
    assert srv.store.get(cid).amount_sat == 2_000


async def test_numbers_are_bounded_before_conversion(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start()
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    tip = bitcoind.rpc("getblockcount")
    proposal = {
        "payer_pubkey": public_key(generate_private_key()).hex(),
        "deposit_sat": 100_000,
        "expiry_height": tip + 60,
        "payer_script": "0014" + "22" * 20,
    }
    async with aiohttp.ClientSession() as s:

        async def post(path: str, raw: bytes) -> tuple[int, str]:
            async with s.post(srv.url + path, data=raw) as r:
                return r.status, (await r.json())["error"]["code"] if r.status >= 400 else ""

        huge = "9" * 5000
        for path, raw in (
            (f"/v1/channels/{cid}/payments", f'{{"amount_sat": {huge}, "signature": "00"}}'),
            (f"/v1/channels/{cid}/payments", f'{{"amount_sat": -{huge}, "signature": "00"}}'),
            (f"/v1/channels/{cid}/payments", f'{{"amount_sat": 1{"0" * 30}, "signature": "00"}}'),
            (f"/v1/channels/{cid}/payments", f'{{"amount_sat": 1.{huge}, "signature": "00"}}'),
            (f"/v1/channels/{cid}/funding", f'{{"txid": "{"ab" * 32}", "vout": {huge}}}'),
            ("/v1/channels", json.dumps({**proposal, "deposit_sat": 0})[:-1] + f', "max_units": {huge}}}'),
        ):
            assert await post(path, raw.encode()) == (400, "bad_request"), raw[:80]
        for expiry in (500_000_000, 2**32, 10**19):
            raw = json.dumps({**proposal, "expiry_height": expiry}).encode()
            assert await post("/v1/channels", raw) == (400, "expiry_out_of_range"), expiry


async def test_exact_retry_across_two_processes_is_answered_with_its_own_amount_only(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    first = await payee_factory.start()
    second = await payee_factory.start(first.config, run_watcher=False)  # one database, two services
    client = payer_client
    cid = await open_channel(client, bitcoind, first.url, 100_000)
    p1 = await client.sign_next(cid, 1_000)
    p2 = await client.sign_next(cid, 2_000)
    async with aiohttp.ClientSession() as s:

        async def pay(url: str, body: dict[str, Any]) -> tuple[int, Any]:
            async with s.post(f"{url}/v1/channels/{cid}/payments", json=body) as r:
                return r.status, await r.json()

        assert (await pay(first.url, p1.to_json()))[1]["amount_sat"] == 1_000
        assert (await pay(second.url, p2.to_json()))[1]["amount_sat"] == 2_000
        # the first process still holds 1,000 in its cache: the retry is not answered with 2,000
        status, ans = await pay(first.url, p1.to_json())
        assert (status, ans["error"]["code"]) == (409, "stale_payment")
        status, ans = await pay(first.url, p2.to_json())  # the exact retry of the stored one
        assert (status, ans["amount_sat"]) == (200, 2_000)


async def test_fuzzed_bodies_never_get_a_500(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start()
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    rng = random.Random(1234)
    valid = {
        "/v1/channels": {
            "payer_pubkey": public_key(generate_private_key()).hex(),
            "deposit_sat": 100_000,
            "expiry_height": bitcoind.rpc("getblockcount") + 60,
            "payer_script": "0014" + "22" * 20,
        },
        f"/v1/channels/{cid}/payments": {"amount_sat": 5_000, "signature": "30" * 70},
        f"/v1/channels/{cid}/funding": {"txid": "ab" * 32, "vout": 0},
        f"/v1/channels/{cid}/close": {"signature": "30" * 70},
    }
    numbers = [
        "0",
        "-1",
        "1e400",
        "1.5",
        "9" * rng.randint(20, 6000),
        "-" + "9" * 5000,
        "true",
        "null",
        '"7"',
        "[]",
        "{}",
        "1" + "0" * 4400,
        "NaN",
        "-0",
        "0x10",
    ]
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            path, body = rng.choice(list(valid.items()))
            raw = json.dumps(body)
            kind = rng.random()
            if kind < 0.5:  # a field replaced by a hostile literal
                field = rng.choice(list(body))
                raw = raw.replace(json.dumps(body[field]), rng.choice(numbers), 1)
            elif kind < 0.8:  # random bytes flipped
                b = bytearray(raw.encode())
                for _ in range(rng.randint(1, 5)):
                    b[rng.randrange(len(b))] = rng.randrange(256)
                raw = bytes(b).decode("latin-1")
            else:  # truncated or doubled
                raw = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else raw + raw
            async with s.post(srv.url + path, data=raw.encode("latin-1", "replace")) as r:
                statuses[r.status] = statuses.get(r.status, 0) + 1
                body_json = await r.json()
                assert r.status < 500 or body_json["error"]["code"] in ("node_unavailable",), (path, raw[:200])
                if r.status >= 400:
                    assert isinstance(body_json["error"]["code"], str)
    assert 500 not in statuses and sum(statuses.values()) == 300
