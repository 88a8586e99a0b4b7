"""Proposals are no lock-out lever (a real regtest node, real sockets from several loopback addresses):
a flood of proposals from ten addresses fills the total cap, yet a new client is served (the
flooders' oldest proposals give way), the flooders stay capped; behind a trusted reverse proxy each
client (by X-Forwarded-For) has a cap of its own, and a client cannot forge its address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys, script
from btcchannel.payee.config import ServerConfig
from btcchannel.testing import wait_until_async
from btcchannel.testing.fixtures import PayeeFactory

PER_CLIENT = 10
TOTAL = 100


def _proposal(bitcoind: RegtestNode) -> dict[str, Any]:
    pub = keys.public_key(keys.generate_private_key())
    return {
        "payer_pubkey": pub.hex(),
        "deposit_sat": 50_000,
        "expiry_height": bitcoind.tip_height() + 50,
        "payer_script": script.p2wpkh_script(pub).hex(),
    }


async def _propose(
    url: str, body: dict[str, Any], source: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """POST a proposal from the local address ``source`` (a fresh connection each time)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as s:
        async with s.post(f"{url}/v1/channels", json=body, headers=headers or {}) as resp:
            return resp.status, await resp.json()


async def test_a_proposal_flood_from_ten_addresses_locks_no_one_out(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
) -> None:
    srv = await payee_factory.start(max_proposals=TOTAL, max_proposals_per_client=PER_CLIENT, proposal_grace_s=1.0)
    body = _proposal(bitcoind)
    flooders = [f"127.0.0.{i}" for i in range(2, 12)]
    for source in flooders:
        for _ in range(PER_CLIENT):
            assert (await _propose(srv.url, body, source))[0] == 201
    assert srv.store.count_proposals() == TOTAL
    assert (await _propose(srv.url, body, flooders[0]))[0] == 503  # the flooder's own cap

    async def served(source: str) -> bool:
        status, ans = await _propose(srv.url, body, source)
        assert status in (201, 503), ans
        return status == 201

    # new clients are served once the flood's proposals are past the grace period (not 20 minutes)
    for newcomer in ("127.0.0.50", "127.0.0.51", "127.0.0.52"):
        await wait_until_async(lambda: served(newcomer), timeout=10, what=f"{newcomer} to be served")
    assert srv.store.count_proposals() == TOTAL
    lapsed = [r for r in srv.store.list(["failed"]) if r.end_reason == "lapsed"]
    assert len(lapsed) == 3 and all(r.client in flooders for r in lapsed)
    # the flooders cannot take the places back: a lapsed proposal counts against its own client's cap
    for source in flooders:
        assert (await _propose(srv.url, body, source))[0] == 503
    # a new client's single proposal is never the one to give way to another single one
    assert (await _propose(srv.url, body, "127.0.0.53"))[0] == 201
    newcomers = {r.client for r in srv.store.list(["proposed"])} - set(flooders)
    assert newcomers == {"127.0.0.50", "127.0.0.51", "127.0.0.52", "127.0.0.53"}


async def test_clients_behind_a_trusted_proxy_are_told_apart(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
) -> None:
    srv = await payee_factory.start(max_proposals_per_client=2, trusted_proxies=("127.0.0.1",))
    body = _proposal(bitcoind)
    fwd = {"X-Forwarded-For": "198.51.100.7, 203.0.113.7"}  # (what the client sent, then the proxy's view)
    for _ in range(2):
        assert (await _propose(srv.url, body, headers=fwd))[0] == 201
    assert (await _propose(srv.url, body, headers=fwd))[0] == 503  # that client's cap
    assert (await _propose(srv.url, body, headers={"X-Forwarded-For": "203.0.113.8"}))[0] == 201  # another client
    clients = sorted(r.client or "" for r in srv.store.list(["proposed"]))
    assert clients == ["203.0.113.7", "203.0.113.7", "203.0.113.8"]
    # from an address that is not a trusted proxy, the header is not believed
    assert (await _propose(srv.url, body, "127.0.0.9", {"X-Forwarded-For": "203.0.113.99"}))[0] == 201
    assert "127.0.0.9" in {r.client for r in srv.store.list(["proposed"])}
    assert "203.0.113.99" not in {r.client for r in srv.store.list(["proposed"])}


def test_an_ipv6_client_is_its_64(tmp_path: Path) -> None:
    cfg = ServerConfig(datadir=tmp_path, trusted_proxies=("10.0.0.0/8",))
    assert (
        cfg.client_address("2001:db8:1:2:aaaa::1", [])
        == cfg.client_address("2001:db8:1:2:bbbb::7", [])
        == "2001:db8:1:2::/64"
    )
    assert cfg.client_address("2001:db8:1:3::1", []) == "2001:db8:1:3::/64"
    assert cfg.client_address("::ffff:192.0.2.1", []) == "192.0.2.1"
    assert cfg.client_address("10.1.2.3", ["192.0.2.9, 10.9.9.9"]) == "192.0.2.9"  # past the trusted hops
    assert cfg.client_address("10.1.2.3", ["not-an-address"]) == "10.1.2.3"
    assert cfg.client_address("192.0.2.5", ["198.51.100.1"]) == "192.0.2.5"  # not a proxy: not believed
