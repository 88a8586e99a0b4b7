"""The watcher's decisions, table-driven and without a node (btcchannel.payee.decide).

Each case gives a stored channel, the chain as a table of facts, and the actions the decision
must take in order; the facts a case does not list must not be asked for (so a lookup the
decision does not need, such as a block scan for the spender of an unspent funding, fails the
case). :func:`run` plays the executor: it answers each ``Need`` from the table and applies the
actions that go on, as :meth:`btcchannel.payee.watcher.Watcher.check` does with the node.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from btcchannel.core.state import ChannelState, SpendKind
from btcchannel.payee.decide import (
    UNKNOWN,
    Action,
    Bump,
    ChannelView,
    Close,
    Conflict,
    Fact,
    Facts,
    FundingLost,
    MarkClosed,
    Need,
    Nothing,
    Open,
    Outbid,
    Policy,
    Rebroadcast,
    RecordDepth,
    Resend,
    SendClose,
    SpendSeen,
    decide,
)

POLICY = Policy(min_confirmations=2, final_confirmations=6, close_margin_blocks=10, bump_after_blocks=3)
EXPIRY = 200  # closing height 190; deadline window: the last 5 blocks (tip >= 195)
TIP = 150
C1, C2 = "c1" * 32, "c2" * 32  # our closes
REFUND, OTHER, DOUBLE = "rf" * 32, "0t" * 32, "d5" * 32

FUNDING = ChannelView(ChannelState.FUNDING, EXPIRY, confirmations=0)
OPEN = ChannelView(ChannelState.OPEN, EXPIRY, confirmations=3, signed=True)
UNPAID_OPEN = replace(OPEN, signed=False)
CLAIMED = ChannelView(ChannelState.CLOSING, EXPIRY, confirmations=30, signed=True)  # no close recorded yet
CLOSING = replace(CLAIMED, close_txid=C1, close_tx_txid=C1, close_txids=(C1,), close_height=TIP - 2)
UNSENT = replace(CLAIMED, close_tx_txid=C1, close_txids=(C1,))  # recorded, its broadcast not
BUMP_UNSENT = replace(CLOSING, close_tx_txid=C2, close_txids=(C1, C2))  # a replacement recorded, not sent

#: the funding output spent, by a spend the block follower noted (no lookup of the funding's depth)
NOTED = {Fact.FUNDING_OUT: None, Fact.CONFIRMED_SPENDER: REFUND}
#: the funding output spent in the mempool, the funding at depth 10
IN_MEMPOOL = {Fact.FUNDING_OUT: None, Fact.CONFIRMED_SPENDER: None, Fact.FUNDING_DEPTH: 10}
#: our close in neither chain nor mempool, the funding at depth 30
DROPPED = {Fact.CLOSE_DEPTH: None, Fact.CONFIRMED_SPENDER: None, Fact.FUNDING_DEPTH: 30}
#: the funding transaction in neither chain nor mempool
VANISHED = {Fact.FUNDING_OUT: None, Fact.CONFIRMED_SPENDER: None, Fact.FUNDING_DEPTH: None}


def refund(depth: int) -> SpendSeen:
    return SpendSeen(SpendKind.REFUND, depth)


@dataclass
class Case:
    name: str
    channel: ChannelView
    world: dict[Any, Any]
    actions: list[Action]
    tip: int = TIP
    #: the facts asked, in order (checked when given)
    asked: list[Fact] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run(channel: ChannelView, world: dict[Any, Any], tip: int = TIP) -> tuple[list[Action], list[Need]]:
    """Decide until an action ends the look: (the actions taken, the facts asked).

    ``world``: each Fact's answer; ``"resent"``/``"sent"``: the outcome of Resend/SendClose;
    ``"after_resend"``: the channel as read after a successful Resend."""
    facts = Facts(channel, tip, POLICY)
    actions: list[Action] = []
    asked: list[Need] = []
    for _ in range(40):
        step = decide(facts)
        assert decide(facts) == step  # pure: the same facts, the same decision
        if isinstance(step, Need):
            assert step.fact in world, f"asked for {step.fact.value} ({step.txid}), not in the case's facts"
            assert getattr(facts, step.fact.value) is UNKNOWN, f"{step.fact.value} asked twice"
            asked.append(step)
            facts = facts.learn(step.fact, world[step.fact])
            continue
        actions.append(step)
        if isinstance(step, RecordDepth):
            facts = facts.with_depth(step.confirmations)
        elif isinstance(step, Resend):
            ok = world["resent"]
            facts = facts.after_send(world.get("after_resend", facts.channel) if ok else facts.channel, resent=ok)
        elif isinstance(step, SendClose):
            facts = facts.after_send(facts.channel, sent=world["sent"])
        if not step.goes_on:
            return actions, asked
    raise AssertionError("no decision")


CASES = [
    # --- funding -----------------------------------------------------------------------------
    Case("funding in the mempool, as stored", FUNDING, {Fact.FUNDING_OUT: 0}, [Nothing()], asked=[Fact.FUNDING_OUT]),
    Case(
        "funding at 1 of 2 confirmations: depth recorded", FUNDING, {Fact.FUNDING_OUT: 1}, [RecordDepth(1), Nothing()]
    ),
    Case("funding at min_confirmations opens", FUNDING, {Fact.FUNDING_OUT: 2}, [Open(2)]),
    Case("funding deep at the first look opens at its depth", FUNDING, {Fact.FUNDING_OUT: 9}, [Open(9)]),
    Case(
        "funding double-spent, final: failed",
        FUNDING,
        {**VANISHED, Fact.DOUBLE_SPENDER: DOUBLE, Fact.DOUBLE_SPENDER_DEPTH: 6},
        [Conflict(ChannelState.FAILED, DOUBLE, "funding_double_spent")],
    ),
    Case(
        "funding double-spent, one short of final: waits",
        FUNDING,
        {**VANISHED, Fact.DOUBLE_SPENDER: DOUBLE, Fact.DOUBLE_SPENDER_DEPTH: 5},
        [Nothing()],
    ),
    Case(
        "funding double-spent in the mempool after a reorg took it out: depth 0",
        replace(FUNDING, confirmations=1),
        {**VANISHED, Fact.DOUBLE_SPENDER: DOUBLE, Fact.DOUBLE_SPENDER_DEPTH: 0},
        [RecordDepth(0), Nothing()],
    ),
    Case("funding evicted, no double spend: waits", FUNDING, {**VANISHED, Fact.DOUBLE_SPENDER: None}, [Nothing()]),
    Case(
        "funding spent by a final refund (noted spend: no depth lookup)",
        FUNDING,
        {**NOTED, Fact.FRESH: FUNDING, Fact.SPEND: refund(6)},
        [Conflict(ChannelState.REFUNDED, REFUND, "payer_refund")],
        asked=[Fact.FUNDING_OUT, Fact.CONFIRMED_SPENDER, Fact.FRESH, Fact.SPEND],
    ),
    # --- open --------------------------------------------------------------------------------
    Case("open, nothing due: one lookup", OPEN, {Fact.FUNDING_OUT: 3}, [Nothing()], asked=[Fact.FUNDING_OUT]),
    Case("open, deeper: depth recorded", OPEN, {Fact.FUNDING_OUT: 4}, [RecordDepth(4), Nothing()]),
    Case("reorg: funding below min_confirmations", OPEN, {Fact.FUNDING_OUT: 1}, [FundingLost(1)]),
    Case("reorg: funding back in the mempool", OPEN, {Fact.FUNDING_OUT: 0}, [FundingLost(0)]),
    Case(
        "reorg: funding in neither chain nor mempool (no double-spend lookup)",
        OPEN,
        VANISHED,
        [FundingLost(0)],
        asked=[Fact.FUNDING_OUT, Fact.CONFIRMED_SPENDER, Fact.FUNDING_DEPTH],
    ),
    Case(
        "reorg: funding spent in the mempool, itself at 1 confirmation",
        OPEN,
        {**IN_MEMPOOL, Fact.FUNDING_DEPTH: 1},
        [FundingLost(1)],
    ),
    Case("expiry margin: closes at the closing height", OPEN, {Fact.FUNDING_OUT: 3}, [Close("expiry_margin")], tip=190),
    Case("expiry margin: one block before it, nothing", OPEN, {Fact.FUNDING_OUT: 3}, [Nothing()], tip=189),
    Case("expiry margin reached past it (a late look)", OPEN, {Fact.FUNDING_OUT: 3}, [Close("expiry_margin")], tip=199),
    Case(
        "deeper and at the closing height: depth recorded, then the close",
        OPEN,
        {Fact.FUNDING_OUT: 7},
        [RecordDepth(7), Close("expiry_margin")],
        tip=190,
    ),
    Case(
        "payment timeout", replace(OPEN, timed_end="payment_timeout"), {Fact.FUNDING_OUT: 3}, [Close("payment_timeout")]
    ),
    Case("idle timeout", replace(OPEN, timed_end="idle_timeout"), {Fact.FUNDING_OUT: 3}, [Close("idle_timeout")]),
    Case("end time", replace(OPEN, timed_end="end_time_reached"), {Fact.FUNDING_OUT: 3}, [Close("end_time_reached")]),
    Case(
        "expiry margin before a timed end",
        replace(OPEN, timed_end="idle_timeout"),
        {Fact.FUNDING_OUT: 3},
        [Close("expiry_margin")],
        tip=190,
    ),
    Case(
        "no timed end while the funding is shallow",
        replace(OPEN, timed_end="idle_timeout"),
        {Fact.FUNDING_OUT: 1},
        [FundingLost(1)],
    ),
    Case(
        "refund in the mempool races an open channel: its close is claimed and sent alone",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: OPEN, Fact.SPEND: refund(0)},
        [Close("expiry_margin", alone=True)],
    ),
    Case(
        "refund in the mempool, no payment: left to it",
        UNPAID_OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: UNPAID_OPEN, Fact.SPEND: refund(0)},
        [Nothing()],
    ),
    Case(
        "refund in the mempool, payments too small for a close: left to it",
        replace(OPEN, uneconomic=True),
        {**IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: replace(OPEN, uneconomic=True), Fact.SPEND: refund(0)},
        [Nothing()],
    ),
    Case(
        "refund mined, not final: waits (a reorg may undo it)",
        OPEN,
        {**NOTED, Fact.FRESH: OPEN, Fact.SPEND: refund(5)},
        [Nothing()],
    ),
    Case(
        "refund final: refunded",
        OPEN,
        {**NOTED, Fact.FRESH: OPEN, Fact.SPEND: refund(6)},
        [Conflict(ChannelState.REFUNDED, REFUND, "payer_refund")],
    ),
    Case(
        "another spend final: failed",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: OTHER, Fact.FRESH: OPEN, Fact.SPEND: SpendSeen(SpendKind.OTHER, 8)},
        [Conflict(ChannelState.FAILED, OTHER, "conflicting_spend")],
    ),
    Case(
        "another spend in the mempool: our close outbids it",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: OTHER, Fact.FRESH: OPEN, Fact.SPEND: SpendSeen(SpendKind.OTHER, 0)},
        [Close("expiry_margin", alone=True)],
    ),
    Case(
        "a spend the node cannot find: failed",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: OTHER, Fact.FRESH: OPEN, Fact.SPEND: None},
        [Conflict(ChannelState.FAILED, OTHER, "conflicting_spend")],
    ),
    Case(
        "our close sent outside the service (--close-tx): claimed at once",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: C1, Fact.FRESH: OPEN, Fact.SPEND: SpendSeen(SpendKind.CLOSE, 0)},
        [Close("operator", alone=True)],
    ),
    Case(
        "spent by a close claimed and recorded meanwhile (read again): closed once final",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: C1, Fact.FRESH: CLOSING, Fact.SPENDER_DEPTH: 6},
        [MarkClosed(C1)],
    ),
    Case(
        "spent, and the channel ended meanwhile (read again): nothing",
        OPEN,
        {**NOTED, Fact.FRESH: replace(OPEN, state=ChannelState.REFUNDED)},
        [Nothing()],
    ),
    Case(
        "funding spent, nothing found spending it (a block came meanwhile): waits",
        OPEN,
        {**IN_MEMPOOL, Fact.SPENDER: None},
        [Nothing()],
    ),
    # --- closing: the first close --------------------------------------------------------------
    Case("claimed: its close is sent", CLAIMED, {"sent": True}, [SendClose(), Nothing()], asked=[]),
    Case(
        "claimed, the send refused, funding unspent: retried next pass",
        CLAIMED,
        {"sent": False, Fact.FUNDING_OUT: 30},
        [SendClose(), Nothing()],
    ),
    Case(
        "claimed, the send refused because a refund got there first: outbid",
        CLAIMED,
        {"sent": False, **IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: CLAIMED, Fact.SPEND: refund(0)},
        [SendClose(), Outbid(REFUND)],
    ),
    Case(
        "claimed without a payment: nothing to send",
        replace(CLAIMED, signed=False),
        {Fact.FUNDING_OUT: 30},
        [Nothing()],
    ),
    Case(
        "claimed without a payment, refunded: final",
        replace(CLAIMED, signed=False),
        {**NOTED, Fact.FRESH: replace(CLAIMED, signed=False), Fact.SPEND: refund(6)},
        [Conflict(ChannelState.REFUNDED, REFUND, "payer_refund")],
    ),
    Case(
        "uneconomic close, refund in the mempool: not outbid",
        replace(CLAIMED, uneconomic=True),
        {**IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: replace(CLAIMED, uneconomic=True), Fact.SPEND: refund(0)},
        [Nothing()],
    ),
    Case(
        "recorded, not sent (process died): resent, then watched",
        UNSENT,
        {"resent": True, "after_resend": CLOSING, Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1},
        [Resend(), Nothing()],
    ),
    Case(
        "refund racing a recorded close: resend refused, funding spent: outbid",
        UNSENT,
        {"resent": False, **IN_MEMPOOL, Fact.SPENDER: REFUND, Fact.FRESH: UNSENT, Fact.SPEND: refund(0)},
        [Resend(), Outbid(REFUND)],
    ),
    Case(
        "refund racing a recorded close, the refund final: refunded",
        UNSENT,
        {"resent": False, **NOTED, Fact.FRESH: UNSENT, Fact.SPEND: refund(6)},
        [Resend(), Conflict(ChannelState.REFUNDED, REFUND, "payer_refund")],
    ),
    Case(
        "resend refused, funding unspent: the close is sent (taken over)",
        UNSENT,
        {"resent": False, Fact.FUNDING_OUT: 30, "sent": True},
        [Resend(), SendClose(), Nothing()],
    ),
    Case(
        "a replacement recorded, not sent, refused: the last sent close is watched",
        BUMP_UNSENT,
        {"resent": False, Fact.CLOSE_DEPTH: 2},
        [Resend(), Nothing()],
        asked=[Fact.CLOSE_DEPTH],
    ),
    # --- closing: the close sent ----------------------------------------------------------------
    Case("final depth: closed", CLOSING, {Fact.CLOSE_DEPTH: 6}, [MarkClosed(C1)]),
    Case("one short of final depth: waits", CLOSING, {Fact.CLOSE_DEPTH: 5}, [Nothing()]),
    Case("mined at 1: waits", CLOSING, {Fact.CLOSE_DEPTH: 1}, [Nothing()]),
    Case("in the mempool, 2 blocks: no bump yet", CLOSING, {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1}, [Nothing()]),
    Case(
        "in the mempool, bump_after_blocks: bumped",
        replace(CLOSING, close_height=TIP - 3),
        {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1},
        [Bump(urgent=False, waited=3)],
    ),
    Case(
        "sent in this block: at most one replacement a block",
        replace(CLOSING, close_height=TIP),
        {Fact.CLOSE_DEPTH: 0},
        [Nothing()],
        asked=[Fact.CLOSE_DEPTH],
    ),
    Case(
        "replaced in this pass already (its batch): not again",
        replace(CLOSING, close_height=TIP - 3),
        {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C2},
        [Nothing()],
    ),
    Case(
        "deadline window: bumped every block, to the deadline rate",
        replace(CLOSING, close_height=194),
        {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1},
        [Bump(urgent=True, waited=1)],
        tip=195,
    ),
    Case(
        "one block before the deadline window: not urgent",
        replace(CLOSING, close_height=193),
        {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1},
        [Nothing()],
        tip=194,
    ),
    Case(
        "pinned close at the deadline (a payer's child on it): bumped all the same",
        replace(CLOSING, close_height=197),
        {Fact.CLOSE_DEPTH: 0, Fact.LATEST_CLOSE: C1},
        [Bump(urgent=True, waited=1)],
        tip=198,
    ),
    Case(
        "dropped from the mempool, nothing spends the funding: rebroadcast",
        CLOSING,
        {**DROPPED, Fact.SPENDER: None},
        [Rebroadcast()],
    ),
    Case(
        "reorg took the close's block out, nothing spends the funding: rebroadcast",
        CLOSING,
        {**DROPPED, Fact.SPENDER: None},
        [Rebroadcast()],
    ),
    Case(
        "dropped, a refund in the mempool: outbid",
        CLOSING,
        {**DROPPED, Fact.SPENDER: REFUND, Fact.FRESH: CLOSING, Fact.SPEND: refund(0)},
        [Outbid(REFUND)],
    ),
    Case(
        "dropped, a refund mined, not final: waits",
        CLOSING,
        {**DROPPED, Fact.SPENDER: REFUND, Fact.FRESH: CLOSING, Fact.SPEND: refund(2)},
        [Nothing()],
    ),
    Case(
        "double spend: another spend final",
        CLOSING,
        {**DROPPED, Fact.SPENDER: OTHER, Fact.FRESH: CLOSING, Fact.SPEND: SpendSeen(SpendKind.OTHER, 6)},
        [Conflict(ChannelState.FAILED, OTHER, "conflicting_spend")],
    ),
    Case(
        "an earlier close of ours confirmed instead: closed by it once final",
        replace(CLOSING, close_txids=(C2, C1)),
        {**DROPPED, Fact.SPENDER: C2, Fact.SPENDER_DEPTH: 6},
        [MarkClosed(C2)],
    ),
    Case(
        "an earlier close of ours confirmed, not final: waits",
        replace(CLOSING, close_txids=(C2, C1)),
        {**DROPPED, Fact.SPENDER: C2, Fact.SPENDER_DEPTH: 2},
        [Nothing()],
    ),
    Case(
        "a close of ours recorded by another process (payee branch): adopted once final",
        CLOSING,
        {**DROPPED, Fact.SPENDER: C2, Fact.FRESH: CLOSING, Fact.SPEND: SpendSeen(SpendKind.CLOSE, 6)},
        [MarkClosed(C2)],
    ),
    Case(
        "a close of ours recorded by another process, not final: waits",
        CLOSING,
        {**DROPPED, Fact.SPENDER: C2, Fact.FRESH: CLOSING, Fact.SPEND: SpendSeen(SpendKind.CLOSE, 1)},
        [Nothing()],
    ),
    Case(
        "the funding double-spent under a closing channel: failed once final",
        CLOSING,
        {
            Fact.CLOSE_DEPTH: None,
            Fact.CONFIRMED_SPENDER: None,
            Fact.FUNDING_DEPTH: None,
            Fact.DOUBLE_SPENDER: DOUBLE,
            Fact.DOUBLE_SPENDER_DEPTH: 7,
        },
        [Conflict(ChannelState.FAILED, DOUBLE, "funding_double_spent")],
    ),
    Case(
        "a spend the follower noted: no block scan",
        CLOSING,
        {Fact.CLOSE_DEPTH: None, Fact.CONFIRMED_SPENDER: REFUND, Fact.FRESH: CLOSING, Fact.SPEND: refund(6)},
        [Conflict(ChannelState.REFUNDED, REFUND, "payer_refund")],
        asked=[Fact.CLOSE_DEPTH, Fact.CONFIRMED_SPENDER, Fact.FRESH, Fact.SPEND],
    ),
    # --- nothing to watch --------------------------------------------------------------------------
    *[
        Case(f"{state.value}: nothing", replace(OPEN, state=state), {}, [Nothing()], asked=[])
        for state in (ChannelState.PROPOSED, ChannelState.CLOSED, ChannelState.REFUNDED, ChannelState.FAILED)
    ],
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decision(case: Case) -> None:
    actions, asked = run(case.channel, case.world, case.tip)
    assert actions == case.actions
    if case.asked is not None:
        assert [n.fact for n in asked] == case.asked


def test_the_table_is_large_and_names_are_unique() -> None:
    assert len({c.name for c in CASES}) == len(CASES) >= 60


def test_lookups_name_the_transaction_they_are_about() -> None:
    _, asked = run(CLOSING, {**DROPPED, Fact.SPENDER: REFUND, Fact.FRESH: CLOSING, Fact.SPEND: refund(0)})
    assert [(n.fact, n.txid) for n in asked] == [
        (Fact.CLOSE_DEPTH, C1),
        (Fact.CONFIRMED_SPENDER, None),
        (Fact.FUNDING_DEPTH, None),
        (Fact.SPENDER, None),
        (Fact.FRESH, None),
        (Fact.SPEND, REFUND),
    ]
    _, asked = run(FUNDING, {**VANISHED, Fact.DOUBLE_SPENDER: DOUBLE, Fact.DOUBLE_SPENDER_DEPTH: 1})
    assert asked[-1] == Need(Fact.DOUBLE_SPENDER_DEPTH, DOUBLE)


def test_a_send_forgets_what_was_learnt_of_the_chain() -> None:
    """After a broadcast the funding is looked up again (it may be spent by now)."""
    facts = Facts(UNSENT, TIP, POLICY).learn(Fact.FUNDING_OUT, 30)
    after = facts.after_send(UNSENT, resent=False)
    assert after.funding_out is UNKNOWN and after.resent is False
    assert decide(after) == Need(Fact.FUNDING_OUT)


def test_every_fact_and_action_is_reached_by_the_table() -> None:
    asked: set[Fact] = set()
    taken: set[type[Action]] = set()
    for case in CASES:
        actions, needs = run(case.channel, case.world, case.tip)
        asked |= {n.fact for n in needs}
        taken |= {type(a) for a in actions}
    assert asked == set(Fact)
    assert taken == {
        Nothing,
        RecordDepth,
        Open,
        FundingLost,
        Close,
        MarkClosed,
        Conflict,
        Bump,
        Rebroadcast,
        Outbid,
        Resend,
        SendClose,
    }


def test_the_decisions_import_nothing_that_does_io() -> None:
    code = (
        "import sys, btcchannel.payee.decide; "
        "print(' '.join(m for m in sys.modules if m.split('.')[0] in "
        "('asyncio', 'sqlite3', 'bitcoinrpc', 'httpx', 'aiohttp', 'psycopg') "
        "or m.startswith(('btcchannel.store', 'btcchannel.bitcoind', 'btcchannel.payee.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout.split()
    assert out == ["btcchannel.payee.decide"]


def test_the_watcher_answers_every_fact_and_performs_every_action() -> None:
    from btcchannel.payee.watcher import Watcher

    watcher = Watcher.__new__(Watcher)  # (the tables name bound methods only: no node, no store)
    assert set(watcher._gatherers) == set(Fact)
    assert set(watcher._actions) == set(Action.__subclasses__())
