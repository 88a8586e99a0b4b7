"""The payer steps the state its payee reports through the core's transition table (no node):
``events_between``, ``state_after_report`` and the client's bookkeeping of a report and of a
refresh that finds an open channel's funding out of the chain."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest

from btcchannel.core import keys
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import TERMINAL_STATES, TRANSITIONS, ChannelEvent, ChannelState, events_between, next_state
from btcchannel.errors import IllegalTransition
from btcchannel.payer.client import PayerClient
from btcchannel.payer.reported import state_after_report
from btcchannel.store import PayerRecord

S = ChannelState
E = ChannelEvent
CID = "cd" * 16


@pytest.mark.parametrize(
    ("start", "target", "events"),
    [
        (S.OPEN, S.OPEN, ()),
        (S.PROPOSED, S.FUNDING, (E.FUNDING,)),
        (S.OPEN, S.FUNDING, (E.FUNDING_LOST,)),
        (S.PROPOSED, S.OPEN, (E.FUNDING, E.FUNDING_CONFIRMED)),
        (S.FUNDING, S.CLOSED, (E.FUNDING_CONFIRMED, E.CLOSED)),
        (S.PROPOSED, S.CLOSED, (E.FUNDING, E.FUNDING_CONFIRMED, E.CLOSED)),
        (S.CLOSING, S.REFUNDED, (E.REFUNDED,)),
    ],
)
def test_events_between_is_the_shortest_run(
    start: ChannelState, target: ChannelState, events: tuple[ChannelEvent, ...]
) -> None:
    assert events_between(start, target) == events


def test_events_between_follows_the_table_or_refuses() -> None:
    """From every state to every other: a run whose edges are all in the table and that ends at the
    target, or IllegalTransition; never a run out of a terminal state."""
    for start in S:
        for target in S:
            try:
                events = events_between(start, target)
            except IllegalTransition:
                assert start is not target
                continue
            assert start not in TERMINAL_STATES or not events
            state = start
            for event in events:
                assert (state, event) in TRANSITIONS
                state = next_state(state, event)
            assert state is target


@pytest.mark.parametrize(
    ("held", "reported", "recorded"),
    [
        (S.OPEN, "funding", S.FUNDING),  # funding_lost reaches the payer
        (S.FUNDING, "open", S.OPEN),
        (S.PROPOSED, "open", S.OPEN),  # the states between were missed
        (S.FUNDING, "closed", S.CLOSED),
        (S.PROPOSED, "failed", S.FAILED),  # the payee let the proposal lapse
        (S.OPEN, "closing", S.CLOSING),
        (S.CLOSING, "refunded", S.REFUNDED),
        (S.OPEN, "open", None),  # nothing new
        (S.CLOSED, "closing", None),  # behind the payer's state
        (S.CLOSING, "open", None),
        (S.FUNDING, "proposed", None),  # the payee has not registered the funding yet
        (S.REFUNDED, "closed", None),  # out of a terminal state
        (S.FAILED, "open", None),
        (S.OPEN, "vanished", None),  # not a state at all
        (S.OPEN, None, None),
        (S.OPEN, 7, None),
        (S.OPEN, {"state": "closed"}, None),
    ],
)
def test_state_after_report(held: ChannelState, reported: Any, recorded: ChannelState | None) -> None:
    assert state_after_report(held, reported, CID) is recorded


def test_an_illegal_report_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    cid = secrets.token_hex(16)  # a channel of its own: a repeated warning is held back by the library's logging
    with caplog.at_level(logging.INFO, logger="btcchannel.payer.reported"):
        assert state_after_report(S.CLOSED, "open", cid) is None
        assert state_after_report(S.OPEN, "vanished", cid) is None
    text = caplog.text
    assert f"channel {cid}: the payee reports open while this payer holds it closed: ignored" in text
    assert "unknown state 'vanished'" in text


class _Node:
    """The node calls a refresh makes, answering as after a reorg that took the funding out."""

    def __init__(self, confirmations: int | None) -> None:
        self.confirmations = confirmations

    async def tip_height(self) -> int:
        return 300

    async def tx_confirmations(self, txid: str) -> int | None:
        return self.confirmations

    async def get_txout(self, outpoint: Any) -> dict[str, Any]:
        return {"value": 0.001}  # the deposit unspent: no close to find


def _client(tmp_path: Path, state: ChannelState, node: Any = None) -> PayerClient:
    params = ChannelParams(
        network="regtest",
        payer_pubkey=keys.public_key(keys.generate_private_key()),
        payee_pubkey=keys.public_key(keys.generate_private_key()),
        expiry_height=500,
        deposit_sat=100_000,
        payer_script=b"\x00\x14" + bytes(20),
    )
    client = PayerClient(tmp_path, node, network="regtest")
    client.store.insert(
        PayerRecord(
            channel_id=CID,
            server_url="http://127.0.0.1:1",
            state=state,
            params=params.to_json(),
            privkey=keys.generate_private_key(),
            deposit_sat=100_000,
            expiry_height=500,
        )
    )
    client.store.set_state(CID, state, funding_txid="ee" * 32, funding_vout=0)
    return client


@pytest.mark.parametrize(
    ("held", "reported", "recorded"),
    [
        (S.OPEN, "funding", S.FUNDING),
        (S.FUNDING, "closed", S.CLOSED),
        (S.CLOSED, "open", S.CLOSED),
        (S.REFUNDED, "closed", S.REFUNDED),
        (S.OPEN, "no such state", S.OPEN),
    ],
)
async def test_the_client_records_a_report_through_the_table(
    tmp_path: Path,
    held: ChannelState,
    reported: str,
    recorded: ChannelState,
) -> None:
    client = _client(tmp_path, held)
    try:
        client._note_remote(client.store.get(CID), {"channel_id": CID, "state": reported, "amount_sat": 0})
        assert client.store.get(CID).state is recorded
    finally:
        await client.aclose()


@pytest.mark.parametrize(("confirmations", "asked"), [(None, True), (0, True), (1, False)])
async def test_refresh_asks_the_payee_about_an_open_channel_whose_funding_left_the_chain(
    tmp_path: Path,
    confirmations: int | None,
    asked: bool,
) -> None:
    """``list`` follows a reorg by itself: an open channel whose funding is in no block any more is
    asked about, and the payee's ``funding`` is recorded (funding_lost)."""
    client = _client(tmp_path, S.OPEN, _Node(confirmations))
    calls: list[str] = []

    async def status(channel_id: str) -> dict[str, Any]:
        calls.append(channel_id)
        obj = {"channel_id": channel_id, "state": "funding", "amount_sat": 0}
        client._note_remote(client.store.get(channel_id), obj)
        return obj

    client.status = status  # type: ignore[method-assign]
    try:
        assert await client.refresh() == 300
        assert calls == ([CID] if asked else [])
        assert client.store.get(CID).state is (S.FUNDING if asked else S.OPEN)
    finally:
        await client.aclose()
