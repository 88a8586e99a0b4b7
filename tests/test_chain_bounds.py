"""Bounded resources: a proposal flood (propose, cancel, repeat) stays within the caps, cancelled and
lapsed proposals count against their client's cap for a while, and old failed rows are deleted."""

from __future__ import annotations

from typing import Any

import pytest

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.core import keys, script
from btcchannel.errors import TooManyChannels
from btcchannel.payee.service import ENDED_PROPOSAL_ROWS
from btcchannel.payer.client import PayerClient
from btcchannel.testing import RunningPayee, wait_until_async
from btcchannel.testing.fixtures import PayeeFactory


async def _propose_and_cancel(client: PayerClient, srv: RunningPayee, bitcoind: RegtestNode) -> str:
    priv = keys.generate_private_key()
    payer_script = script.address_to_script(bitcoind.new_address("miner"), "regtest")
    _, ans = await client.request(
        "POST",
        f"{srv.url}/v1/channels",
        {
            "payer_pubkey": keys.public_key(priv).hex(),
            "deposit_sat": 100_000,
            "expiry_height": bitcoind.tip_height() + 60,
            "payer_script": payer_script.hex(),
        },
    )
    cid = str(ans["channel_id"])
    sig = keys.sign_digest(priv, keys.close_request_digest(cid))
    obj: Any = (await client.request("POST", f"{srv.url}/v1/channels/{cid}/close", {"signature": sig.hex()}))[1]
    assert obj["state"] == "failed" and obj["end_reason"] == "cancelled_by_payer"
    return cid


async def test_proposal_flood_is_bounded(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(
        # a cooldown long enough that three proposals fit in it on a loaded machine
        max_proposals=100,
        max_proposals_per_client=3,
        proposal_cooldown_s=8.0,
        retention_s=3.0,
    )
    accepted = []
    with pytest.raises(TooManyChannels, match="from this client"):
        for _ in range(50):
            accepted.append(await _propose_and_cancel(payer_client, srv, bitcoind))
    assert len(accepted) == 3  # cancelling a proposal does not free its slot at once
    assert len(srv.store.list()) == 3

    async def accepted_again() -> bool:
        try:
            accepted.append(await _propose_and_cancel(payer_client, srv, bitcoind))
        except TooManyChannels:
            return False
        return True

    await wait_until_async(accepted_again, timeout=30, what="a proposal after the cooldown")
    # the failed rows without payments are deleted after their retention
    await wait_until_async(lambda: len(srv.store.list()) == 0, timeout=30, what="old rows pruned")
    assert all(srv.store.find(cid) is None for cid in accepted)


async def test_cancelled_proposals_hold_no_place_in_the_total_cap_and_their_rows_stay_bounded(
    bitcoind: RegtestNode,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    srv = await payee_factory.start(max_proposals=2, max_proposals_per_client=100)
    ids = [await _propose_and_cancel(payer_client, srv, bitcoind) for _ in range(30)]  # all accepted
    assert len(ids) == 30
    rows = srv.store.list()
    assert len(rows) <= ENDED_PROPOSAL_ROWS * 2 + 1  # the oldest ended proposals were deleted
    assert ids[-1] in {r.channel_id for r in rows} and srv.store.find(ids[0]) is None
