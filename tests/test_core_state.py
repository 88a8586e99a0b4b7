"""Unit and property tests of btcchannel.core.state: the transition table, sources, next_state, classify_spend."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from btcchannel.core import channel as channel_module
from btcchannel.core.keys import public_key
from btcchannel.core.params import ChannelParams
from btcchannel.core.script import funding_witness_script, p2wpkh_script
from btcchannel.core.state import (
    TERMINAL_STATES,
    TRANSITIONS,
    ChannelEvent,
    ChannelState,
    PayeeLifecycle,
    SpendKind,
    Transition,
    classify_spend,
    next_state,
    sources,
    transition,
)
from btcchannel.core.tx import CloseInput, OutPoint, build_close_tx, build_refund_tx
from btcchannel.errors import IllegalTransition

PAYER_KEY = hashlib.sha256(b"state-payer").digest()
PAYEE_KEY = hashlib.sha256(b"state-payee").digest()
PAYER, PAYEE = public_key(PAYER_KEY), public_key(PAYEE_KEY)
EXPIRY = 800
DEPOSIT = 500_000
SCRIPT = funding_witness_script(PAYER, PAYEE, EXPIRY)
OTHER_SCRIPT = funding_witness_script(PAYER, PAYEE, EXPIRY + 1)
FUNDING = OutPoint("7c" * 32, 0)
PAIRS = [(s, e) for s in ChannelState for e in ChannelEvent]


# --- the table -------------------------------------------------------------------


def test_table_shape() -> None:
    assert len(TRANSITIONS) == 15
    # the one edge that keeps the state: a claimed close found not to pay for its fee stays closing
    assert [(s, e) for (s, e), t in TRANSITIONS.items() if s is t] == [
        (ChannelState.CLOSING, ChannelEvent.CLOSE_UNECONOMIC)
    ]
    # a funding that leaves the active chain takes an open channel back to funding
    assert sources(ChannelEvent.FUNDING_LOST) == {ChannelState.OPEN}
    # a close may be claimed, and a refund seen, before the funding has its depth
    assert sources(ChannelEvent.CLOSING) == {ChannelState.FUNDING, ChannelState.OPEN}
    assert sources(ChannelEvent.REFUNDED) == {ChannelState.FUNDING, ChannelState.OPEN, ChannelState.CLOSING}
    assert str(ChannelState.OPEN) == "open" and f"{ChannelEvent.CLOSING}" == "closing"
    for (state, event), target in TRANSITIONS.items():
        assert type(state) is ChannelState and type(event) is ChannelEvent and type(target) is ChannelState
        assert state not in TERMINAL_STATES
    assert TERMINAL_STATES == {ChannelState.CLOSED, ChannelState.REFUNDED, ChannelState.FAILED}
    # every non-terminal state can fail; every terminal state is reachable
    assert sources(ChannelEvent.FAILED) == set(ChannelState) - TERMINAL_STATES
    assert {target for target in TRANSITIONS.values()} >= TERMINAL_STATES


@pytest.mark.parametrize("state,event", PAIRS)
def test_next_state_follows_the_table_or_raises(state: ChannelState, event: ChannelEvent) -> None:
    if (state, event) in TRANSITIONS:
        assert next_state(state, event) is TRANSITIONS[(state, event)]
        assert next_state(state, event.value) is TRANSITIONS[(state, event)]  # the string value works too
        assert state in sources(event)
    else:
        with pytest.raises(IllegalTransition, match=event.value):
            next_state(state, event)
        with pytest.raises(IllegalTransition):
            next_state(state, event.value)
        assert state not in sources(event)


@pytest.mark.parametrize("event", list(ChannelEvent))
def test_sources_are_the_table_column(event: ChannelEvent) -> None:
    expected = {s for (s, e2) in TRANSITIONS if e2 == event}
    assert sources(event) == expected
    assert sources(event.value) == expected
    assert isinstance(sources(event), frozenset)


def test_unknown_events_raise() -> None:
    for bad in ("open", "", "FUNDING", "close"):
        with pytest.raises(IllegalTransition):
            sources(bad)
        with pytest.raises(IllegalTransition):
            next_state(ChannelState.OPEN, bad)


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(ChannelState.CLOSED, ChannelEvent.FUNDING)] = ChannelState.OPEN  # type: ignore[index]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list(ChannelEvent)), max_size=12))
def test_any_event_sequence_walks_only_table_edges(events: list[ChannelEvent]) -> None:
    state = ChannelState.PROPOSED
    for event in events:
        if state in TERMINAL_STATES:
            with pytest.raises(IllegalTransition):
                next_state(state, event)
            continue
        if state in sources(event):
            new = next_state(state, event)
            assert TRANSITIONS[(state, event)] is new
            state = new
        else:
            with pytest.raises(IllegalTransition):
                next_state(state, event)
    assert state in set(ChannelState)


# --- classify_spend on the core's own transactions --------------------------------


def _close_witness(amount: int, script: bytes = SCRIPT) -> list[bytes]:
    params = ChannelParams(
        network="regtest",
        payer_pubkey=PAYER,
        payee_pubkey=PAYEE,
        expiry_height=EXPIRY,
        deposit_sat=DEPOSIT,
        payer_script=p2wpkh_script(PAYER),
        funding=FUNDING,
    )
    payer = channel_module.PayerChannel(params, PAYER_KEY, state=ChannelState.OPEN)
    payment = payer.sign_payment(amount)
    inp = CloseInput(FUNDING, DEPOSIT, script, params.payer_script, amount, payment.signature, PAYEE_KEY)
    tx = build_close_tx([inp], p2wpkh_script(PAYEE), 2.0)
    return list(tx.wit.vtxinwit[0].scriptWitness.stack)


def _refund_witness(script: bytes = SCRIPT) -> list[bytes]:
    tx = build_refund_tx(FUNDING, DEPOSIT, script, EXPIRY, PAYER_KEY, p2wpkh_script(PAYER), 1.0)
    return list(tx.wit.vtxinwit[0].scriptWitness.stack)


@pytest.mark.parametrize("amount", [1_000, DEPOSIT])
def test_close_is_close(amount: int) -> None:
    wit = _close_witness(amount)
    assert len(wit) == 4 and wit[2] == b"\x01"
    assert classify_spend(wit, SCRIPT) is SpendKind.CLOSE
    assert classify_spend(tuple(wit), SCRIPT) == "close"
    assert classify_spend(wit, OTHER_SCRIPT) is SpendKind.OTHER


def test_refund_is_refund() -> None:
    wit = _refund_witness()
    assert len(wit) == 3 and wit[1] == b""
    assert classify_spend(wit, SCRIPT) is SpendKind.REFUND
    assert classify_spend(wit, OTHER_SCRIPT) is SpendKind.OTHER


def _mutations() -> list[tuple[str, Any]]:
    close, refund = _close_witness(40_000), _refund_witness()
    return [
        ("empty", []),
        ("script only", [SCRIPT]),
        ("close without its script", close[:3]),
        ("close with another script", close[:3] + [OTHER_SCRIPT]),
        ("close with selector 0x02", [close[0], close[1], b"\x02", SCRIPT]),
        ("close with empty selector", [close[0], close[1], b"", SCRIPT]),
        ("close with empty payee sig", [close[0], b"", b"\x01", SCRIPT]),
        ("close with empty payer sig", [b"", close[1], b"\x01", SCRIPT]),
        ("close with an extra item", [b"\x00"] + close),
        ("refund with selector 0x01", [refund[0], b"\x01", SCRIPT]),
        ("refund with selector 0x00", [refund[0], b"\x00", SCRIPT]),
        ("refund with empty sig", [b"", b"", SCRIPT]),
        ("refund with another script", refund[:2] + [OTHER_SCRIPT]),
        ("refund with an extra item", [b"\x00"] + refund),
        ("p2wpkh-like spend", [refund[0], PAYER]),
    ]


@pytest.mark.parametrize("name,witness", _mutations())
def test_other_shapes_are_other(name: str, witness: list[bytes]) -> None:
    assert classify_spend(witness, SCRIPT) is SpendKind.OTHER, name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_random_stacks_are_other_unless_they_have_the_exact_shape(stack: list[bytes]) -> None:
    kind = classify_spend(stack + [SCRIPT], SCRIPT)
    if len(stack) == 3 and stack[0] and stack[1] and stack[2] == b"\x01":
        assert kind is SpendKind.CLOSE
    elif len(stack) == 2 and stack[0] and stack[1] == b"":
        assert kind is SpendKind.REFUND
    else:
        assert kind is SpendKind.OTHER
    assert classify_spend(stack + [OTHER_SCRIPT], SCRIPT) is SpendKind.OTHER


# --- transition records and the payee's lifecycle ----------------------------------------


def test_a_transition_record_is_a_frozen_table_edge() -> None:
    record = transition("c1", ChannelState.OPEN, "closing", end_reason="operator")
    assert record == Transition(
        "c1", ChannelEvent.CLOSING, ChannelState.OPEN, ChannelState.CLOSING, {"end_reason": "operator"}
    )
    assert (record.event, record.old, record.new) == (ChannelEvent.CLOSING, ChannelState.OPEN, ChannelState.CLOSING)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.new = ChannelState.CLOSED  # type: ignore[misc]
    with pytest.raises(TypeError):
        record.fields["end_reason"] = "other"  # type: ignore[index]
    assert hash(record) == hash(transition("c1", ChannelState.OPEN, ChannelEvent.CLOSING))  # fields not hashed
    # no record of an edge the table lacks, whoever builds it
    with pytest.raises(IllegalTransition):
        Transition("c1", ChannelEvent.CLOSING, ChannelState.OPEN, ChannelState.CLOSED)
    with pytest.raises(IllegalTransition):
        transition("c1", ChannelState.CLOSED, ChannelEvent.FAILED)
    with pytest.raises(IllegalTransition):
        transition("c1", ChannelState.OPEN, "no_such_event")


@pytest.mark.parametrize("state,event", PAIRS)
def test_transition_is_the_table(state: ChannelState, event: ChannelEvent) -> None:
    if (state, event) in TRANSITIONS:
        record = transition("c", state, event)
        assert (record.old, record.event, record.new) == (state, event, TRANSITIONS[(state, event)])
    else:
        with pytest.raises(IllegalTransition):
            transition("c", state, event)


def test_each_payee_event_records_what_it_sets() -> None:
    life = PayeeLifecycle("c2")
    funded = life.funding_seen(OutPoint("ab" * 32, 3), 1, [["cd" * 32, 0]])
    assert (funded.channel_id, funded.old, funded.new) == ("c2", ChannelState.PROPOSED, ChannelState.FUNDING)
    assert dict(funded.fields) == {
        "funding_txid": "ab" * 32,
        "funding_vout": 3,
        "confirmations": 1,
        "funding_inputs": (("cd" * 32, 0),),
        "lapse_at": None,
    }
    assert dict(life.funding_confirmed(6).fields) == {"confirmations": 6} and life.state is ChannelState.OPEN
    assert dict(life.funding_lost(0).fields) == {"confirmations": 0} and life.state is ChannelState.FUNDING
    life.funding_confirmed()
    claimed = life.closing("expiry_margin", 12.5)
    assert claimed.event is ChannelEvent.CLOSING and claimed.old is ChannelState.OPEN
    assert dict(claimed.fields) == {"end_reason": "expiry_margin", "close_claimed_at": 12.5}
    flagged = life.close_uneconomic()
    assert (flagged.old, flagged.new, dict(flagged.fields)) == (
        ChannelState.CLOSING,
        ChannelState.CLOSING,
        {"close_uneconomic": True},
    )
    closed = PayeeLifecycle("c3", ChannelState.CLOSING).closed("ee" * 32, ["dd" * 32])
    assert closed.fields["close_txids"] == ("dd" * 32, "ee" * 32) and closed.fields["close_txid"] == "ee" * 32
    assert PayeeLifecycle("c3", ChannelState.CLOSING).closed("dd" * 32, ["dd" * 32]).fields["close_txids"] == (
        "dd" * 32,
    )
    refunded = PayeeLifecycle("c4", ChannelState.OPEN).refunded("ff" * 32, "payer_refund")
    assert refunded.new is ChannelState.REFUNDED
    assert dict(refunded.fields) == {
        "exception_txid": "ff" * 32,
        "end_reason": "payer_refund",
        "close_uneconomic": False,
    }
    failed = PayeeLifecycle("c5", ChannelState.FUNDING).failed("funding_double_spent", "11" * 32)
    assert failed.new is ChannelState.FAILED and failed.fields["end_reason"] == "funding_double_spent"


def test_only_a_proposal_ends_unfunded_and_only_a_claimed_close_is_uneconomic() -> None:
    ended = PayeeLifecycle("c6").proposal_ended("lapsed")
    assert (ended.event, ended.old, ended.new) == (ChannelEvent.FAILED, ChannelState.PROPOSED, ChannelState.FAILED)
    assert dict(ended.fields) == {"end_reason": "lapsed"}
    for state in set(ChannelState) - {ChannelState.PROPOSED}:
        life = PayeeLifecycle("c6", state)
        with pytest.raises(IllegalTransition):
            life.proposal_ended("cancelled_by_payer")
        assert life.state is state  # nothing moved
    for state in set(ChannelState) - {ChannelState.CLOSING}:
        life = PayeeLifecycle("c7", state)
        with pytest.raises(IllegalTransition):
            life.close_uneconomic()
        assert life.state is state


#: every event of the payee's lifecycle, with arguments
_PAYEE_EVENTS: dict[str, Any] = {
    "funding_seen": lambda life: life.funding_seen(FUNDING, 0),
    "funding_confirmed": lambda life: life.funding_confirmed(1),
    "funding_lost": lambda life: life.funding_lost(0),
    "closing": lambda life: life.closing("operator", 1.0),
    "closed": lambda life: life.closed("aa" * 32),
    "refunded": lambda life: life.refunded("bb" * 32, "payer_refund"),
    "failed": lambda life: life.failed("conflicting_spend", "cc" * 32),
    "proposal_ended": lambda life: life.proposal_ended("lapsed"),
    "close_uneconomic": lambda life: life.close_uneconomic(),
}


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(ChannelState)),
    st.lists(st.sampled_from(sorted(_PAYEE_EVENTS)), max_size=16),
)
def test_no_sequence_of_payee_events_leaves_the_table(start: ChannelState, names: list[str]) -> None:
    life = PayeeLifecycle("prop", start)
    reachable = {start} | {target for (source, _), target in TRANSITIONS.items()}
    for name in names:
        before = life.state
        try:
            record = _PAYEE_EVENTS[name](life)
        except IllegalTransition:
            assert life.state is before  # a refused event moves nothing
            continue
        assert TRANSITIONS[(record.old, record.event)] is record.new  # an edge of the table, and only that
        assert record.old is before and life.state is record.new and record.channel_id == "prop"
        assert before not in TERMINAL_STATES
        assert life.state in reachable
