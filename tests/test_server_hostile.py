"""Hostile clients against a real payee process over real sockets (a real regtest node).

Truncated bodies followed by a disconnect, malformed request lines and headers, oversized
headers, broken chunked framing, garbage JSON, and slow clients (a body that never comes,
headers dribbled a byte at a time): never a 5xx, never a traceback or an ERROR in the log, slow
clients cut off, and the payee still serves payments afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payer.client import PayerClient
from btcchannel.testing import ServerProcess, open_channel
from btcchannel.testing.fixtures import PayeeFactory

REQUESTS = 3_000
SLOW = 20
CONCURRENCY = 50
BODY_TIMEOUT_S = 2.0


def _hostile(cid: str, rng: random.Random) -> bytes:
    """One hostile request (bytes on the wire) of a random kind."""
    path = f"/v1/channels/{cid}/payments"
    kind = rng.randrange(9)
    if kind == 0:  # a body shorter than its Content-Length, then the client goes
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
        ).encode() + b'{"amount_sat": 5'
    if kind == 1:  # a malformed request line
        return rng.choice(
            [
                b"GARBAGE\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\r\n\r\n",
                b"POST  HTTP/1.1\r\n\r\n",
                b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
            ]
        )
    if kind == 2:  # a header without a colon, a bad Content-Length
        return rng.choice(
            [
                f"POST {path} HTTP/1.1\r\nHost x\r\n\r\n".encode(),
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode(),
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n".encode(),
            ]
        )
    if kind == 3:  # an oversized header
        return f"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20_000}\r\n\r\n".encode()
    if kind == 4:  # broken chunked framing
        return (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").encode()
    if kind == 5:  # both framings at once (request smuggling)
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ).encode()
    if kind == 6:  # garbage JSON
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
    if kind == 7:  # a proposal with nonsense
        body = b'{"payer_pubkey": "zz", "deposit_sat": 1e400}'
        return (
            f"POST /v1/channels HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
    # many headers
    return ("GET /v1/info HTTP/1.1\r\nHost: x\r\n" + "".join(f"X-{i}: {i}\r\n" for i in range(500)) + "\r\n").encode()


async def _send(host: str, port: int, data: bytes, cut: bool) -> int | None:
    """Write ``data``; ``cut``: close at once without reading (a client that goes away mid-body),
    else read the status line; the status (None: no answer, the connection closed)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        if cut:
            return None
        line = await asyncio.wait_for(reader.readline(), 30)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else None
    except ConnectionError:
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _slow(host: str, port: int, body: bool) -> float:
    """A slow client: ``body``: complete headers announcing a body that never comes; else headers
    dribbled a byte a second. Returns how long the payee kept the connection open."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        if body:
            writer.write(b"POST /v1/channels HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()
            while await asyncio.wait_for(reader.read(1024), 60):
                pass  # (an error answer may come first; then the payee closes)
        else:
            for byte in b"GET /v1/info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
                writer.write(bytes([byte]))
                await writer.drain()
                try:  # a byte a second, until the payee closes the connection
                    if not await asyncio.wait_for(reader.read(1024), 1.0):
                        break
                except TimeoutError:
                    continue
    except ConnectionError:
        pass
    finally:
        writer.close()
    return loop.time() - start


async def test_hostile_requests_and_slow_clients_are_harmless(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    proc: ServerProcess = payee_factory.process(
        payee_factory.config(body_timeout_s=BODY_TIMEOUT_S, header_timeout_s=BODY_TIMEOUT_S)
    )
    url = await proc.start()
    cid = await open_channel(payer_client, bitcoind, url, 100_000, 60)
    await payer_client.pay(cid, 1_000)
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(18)
    slow = [asyncio.ensure_future(_slow(host, int(port), body=i % 2 == 0)) for i in range(SLOW)]
    statuses: list[int | None] = []
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        data = _hostile(cid, rng)
        async with sem:
            statuses.append(await _send(host, int(port), data, cut=data.endswith(b'{"amount_sat": 5')))

    await asyncio.gather(*(one(i) for i in range(REQUESTS)))
    held = await asyncio.wait_for(asyncio.gather(*slow), 120)
    assert len(statuses) == REQUESTS
    assert not [s for s in statuses if s is not None and s >= 500]  # nothing a client does is a 5xx
    assert max(held) < BODY_TIMEOUT_S + 5  # slow clients are cut off (a dribble would take 240 s)
    # the payee is alive and serves payments as before
    assert proc.proc is not None and proc.proc.poll() is None
    assert await payer_client.pay(cid, 1_000) == 2_000
    text: Any = proc.log_file.read_text(errors="replace")
    assert "Traceback" not in text and not proc.error_lines()
    assert " ERROR " not in text
