"""The payee's logic, no HTTP: proposals, funding registration, payments, metered charging,
close requests and the service's info (the wire protocol of ``docs/PROTOCOL.md``).

A proposal is stored (and counted against the proposal caps) unless it asks to be stateless:
then nothing is written or reserved, and its answer carries a ``proposal_token``
(:class:`~btcchannel.core.proposal.ProposalToken`, MACed with a key from the store's seed, so
every instance on one database accepts it) from which the first funding report rebuilds and
writes the channel; the payee's key derives from the seed and the channel id
(:func:`~btcchannel.core.seed.derive_stateless_key`).

::

    class PayeeService:
        def __init__(self, config: ServerConfig, store: PayeeStore, node: Node,
                     closer: Closer, tip: ChainTip) -> None

Requests are validated strictly (exact JSON fields and types, hex, ranges; see
:mod:`btcchannel.wire`) before anything touches the channel; every rule about amounts,
signatures and states is the core's (``btcchannel.core.channel``: the proposal limits, the
metered service's prepay/postpay amounts, credit and end conditions included;
``ServerConfig.metering`` / ``.proposal_limits`` hand the configured terms to it); a payment
is answered only after ``PayeeStore.record_payment_async`` committed it (the group commit:
nothing on the payment path waits on the disk on the event loop). Closes are the closer's
(:class:`~btcchannel.payee.closer.Closer`); the chain tip is the watcher's
(:class:`~btcchannel.payee.shared.ChainTip`); :func:`btcchannel.payee.http.create_app`
assembles the three.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from typing import Any

from btcchannel.bitcoind.rpc import Node, TxOutInfo
from btcchannel.core import keys, script
from btcchannel.core.channel import PayeeChannel
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.proposal import ProposalToken
from btcchannel.core.seed import derive_stateless_key, proposal_mac_key
from btcchannel.core.state import ChannelState, PayeeLifecycle
from btcchannel.core.terms import Capacity, Metering, Terms, not_open_error
from btcchannel.core.tx import OutPoint
from btcchannel.errors import (
    BadProposalToken,
    BadRequest,
    ChannelClosed,
    ChannelError,
    CreditCapReached,
    FundingMismatch,
    FundingNotFound,
    InternalError,
    NodeUnavailable,
    StalePayment,
    TooManyChannels,
    Unauthorized,
    UnknownChannel,
    WrongAmount,
)
from btcchannel.payee.closer import Closer
from btcchannel.payee.config import ServerConfig
from btcchannel.payee.shared import ChainTip, agreed_terms
from btcchannel.store import PayeeRecord, PayeeStore
from btcchannel.wire import (
    EMPTY_BODY_SHA256,
    MAX_INT_DIGITS,
    PaidRequest,
    RequestAuth,
    channel_object,
    hex_field,
    int_field,
    txid_field,
)

__all__ = ["PayeeService"]

#: the rows of proposals that ended unfunded are kept up to this many times ``max_proposals``
ENDED_PROPOSAL_ROWS = 10


class PayeeService:
    """The payee: validation + core + store + node. The HTTP layer is a thin shell over it."""

    def __init__(self, config: ServerConfig, store: PayeeStore, node: Node, closer: Closer, tip: ChainTip) -> None:
        self.config = config
        self.store = store
        if store.has_seed():
            store.restore_keys()  # a key lost from its row is re-derived (and checked) from the seed
        self.node = node
        self.closer = closer
        self.channels = closer.channels
        self.tip = tip
        #: per channel, the payment being stored and its write (committed to the machine once stored)
        self._pending: dict[str, tuple[Payment, asyncio.Future[PayeeRecord | None]]] = {}
        self._terms: dict[str, Terms] = {}  # each channel's agreed terms (fixed at its proposal)
        self._capacity: dict[str, Capacity] = {}  # each channel's capacity (fixed by its parameters)
        self._secrets: tuple[bytes, bytes] | None = None  # the seed and the proposal MAC key

    @property
    def tip_height(self) -> int:
        """The chain height as the watcher last saw it."""
        return self.tip.height

    def require_fresh_chain(self) -> None:
        """NodeUnavailable (503) unless the node's tip is fresh: no payment on a stale chain view."""
        reason = self.tip.stale_reason(self.config.max_tip_age_s)
        if reason is not None:
            raise NodeUnavailable(f"the payee's view of the chain is stale: {reason}")

    # -- channel objects ----------------------------------------------------------
    def params_of(self, rec: PayeeRecord) -> ChannelParams:
        """The channel's parameters (with the funding outpoint once known)."""
        return self.channels.params_of(rec)

    def build_channel(self, rec: PayeeRecord) -> PayeeChannel:
        """A core ``PayeeChannel`` rebuilt from the stored row, in its state."""
        return self.channels.build(rec)

    def channel(self, cid: str) -> PayeeChannel:
        """The cached core channel of an open channel (rebuilt from the store on a miss)."""
        return self.channels.get(cid)

    def invalidate(self, cid: str) -> None:
        """Forget the cached channel and row (after any state change)."""
        self.channels.invalidate(cid)

    def row(self, cid: str) -> PayeeRecord:
        """The channel's current row for the payment path: an open channel's is kept in memory, as
        this process's commits wrote it (no read per request); see :meth:`Channels.row`."""
        return self.channels.row(cid)

    def _kept(self, rec: PayeeRecord | None) -> PayeeRecord | None:
        """``rec``, a row a commit returned, kept as the channel's current one."""
        if rec is not None:
            self.channels.remember(rec)
        return rec

    def terms_of(self, rec: PayeeRecord) -> Terms:
        """The terms channel ``rec`` was agreed under (never the payee's later configuration).

        Kept per channel once read: stored terms never change (a row from before terms were
        stored follows the configuration, so it is not kept)."""
        terms = self._terms.get(rec.channel_id)
        if terms is None:
            terms = agreed_terms(rec, self.config.terms)
            if rec.terms is not None:
                self._terms[rec.channel_id] = terms
        return terms

    def terms_for(self, cid: str) -> Terms:
        """:meth:`terms_of` by channel id (the store is read only the first time)."""
        terms = self._terms.get(cid)
        return terms if terms is not None else self.terms_of(self.store.get(cid))

    def proposal_terms(self, body: dict[str, Any]) -> Terms:
        """The terms of a proposal: its ``terms`` object, which must state exactly the payee's own
        (``terms_mismatch`` otherwise), or, from a client that sends none, the payee's current terms
        with the legacy ``max_units``/``max_total_sat`` fields as end conditions."""
        legacy = {k: int_field(body, k, 1) for k in ("max_units", "max_total_sat") if body.get(k) is not None}
        if "terms" not in body:
            return self.config.terms.with_end_conditions(**legacy)
        if legacy:
            raise BadRequest("give the end conditions inside terms, not beside it")
        terms = self.config.terms.agree(Terms.from_json(body["terms"]))
        if terms.end_time is not None and terms.end_time <= time.time():
            raise BadRequest("terms.end_time is in the past")
        return terms

    # -- proposals ---------------------------------------------------------------
    def propose(self, body: dict[str, Any], client: str | None = None) -> dict[str, Any]:
        """``POST /v1/channels``: validate a proposal (``client``: the caller's address) and store it,
        or, asked with ``"stateless": true``, answer it with a ``proposal_token`` and store nothing."""
        cfg = self.config
        payer_pubkey = keys.check_public_key(hex_field(body, "payer_pubkey", 65))
        payer_script = script.check_payout_script(hex_field(body, "payer_script", 100))
        deposit = int_field(body, "deposit_sat")
        expiry = int_field(body, "expiry_height", 0, 10**MAX_INT_DIGITS)  # outside the lifetime: expiry_out_of_range
        terms = self.proposal_terms(body)
        # the descriptor script when asked for; a client that does not ask (an older one) keeps the legacy script
        version = body.get("script_version")
        script_version = script.SCRIPT_LEGACY if version is None else script.check_script_version(version)
        stateless = body.get("stateless", False)
        if not isinstance(stateless, bool):
            raise BadRequest("stateless must be true or false")
        self.require_fresh_chain()  # the expiry bounds are relative to the tip
        tip = self.tip_height
        cfg.proposal_limits.check_proposal(deposit, expiry, tip)
        if stateless:
            token = ProposalToken(
                channel_id=secrets.token_hex(16),
                issued_at=math.ceil(time.time()),  # (rounded up: a payer's lapse is never after the payee's)
                created_height=tip,
                payer_pubkey=payer_pubkey,
                payer_script=payer_script,
                deposit_sat=deposit,
                expiry_height=expiry,
                script_version=script_version,
                terms=terms,
            )
            params = self._stateless_params(token)
            answer = self._proposal_answer(token.channel_id, params, terms)
            answer["proposal_token"] = token.encode(self._proposal_secrets()[1], cfg.network)
            return answer
        self._admit_proposal(client)
        key_index, payee_priv = self.store.reserve_key()  # committed before the key is used: never reused
        params = ChannelParams(
            network=cfg.network,
            payer_pubkey=payer_pubkey,
            payee_pubkey=keys.public_key(payee_priv),
            expiry_height=expiry,
            deposit_sat=deposit,
            payer_script=payer_script,
            script_version=script_version,
        )
        cid = secrets.token_hex(16)
        now = time.time()
        self.store.insert_proposal(
            PayeeRecord(
                channel_id=cid,
                state=ChannelState.PROPOSED,
                params=params.to_json(),
                privkey=payee_priv,
                deposit_sat=deposit,
                expiry_height=expiry,
                created_at=now,
                lapse_at=now + cfg.proposal_ttl_s,
                max_units=terms.max_units,
                max_total_sat=terms.max_total_sat,
                created_height=tip,
                terms=terms.to_json(),
                payout_script=self.closer.payee_script.hex() or None,
                client=client,
                key_index=key_index,
            )
        )
        return self._proposal_answer(cid, params, terms)

    @staticmethod
    def _proposal_answer(cid: str, params: ChannelParams, terms: Terms) -> dict[str, Any]:
        return {
            "channel_id": cid,
            "payee_pubkey": params.payee_pubkey.hex(),
            "witness_script": params.witness_script.hex(),
            "funding_address": params.funding_address,
            "funding_script": params.funding_script.hex(),
            "deposit_sat": params.deposit_sat,
            "expiry_height": params.expiry_height,
            "terms": terms.to_json(),
            "script_version": params.script_version,
        }

    def _proposal_secrets(self) -> tuple[bytes, bytes]:
        """(the store's seed, the proposal MAC key derived from it), read once: the seed of a store
        never changes once it exists (created here on first use, like the first channel key's)."""
        if self._secrets is None:
            seed = self.store.seed()
            self._secrets = (seed, proposal_mac_key(seed))
        return self._secrets

    def _stateless_params(self, token: ProposalToken) -> ChannelParams:
        """The channel parameters a stateless proposal's token stands for (the payee's key derived
        from the seed and the channel id: nothing reserved, nothing written)."""
        seed = self._proposal_secrets()[0]
        return ChannelParams(
            network=self.config.network,
            payer_pubkey=token.payer_pubkey,
            payee_pubkey=keys.public_key(derive_stateless_key(seed, token.channel_id)),
            expiry_height=token.expiry_height,
            deposit_sat=token.deposit_sat,
            payer_script=token.payer_script,
            script_version=token.script_version,
        )

    def _admit_proposal(self, client: str | None) -> None:
        """Room for one more unfunded proposal from ``client``, or ``TooManyChannels``.

        A client's own cap counts its proposals waiting for a funding plus those that lapsed or were
        cancelled within ``proposal_cooldown_s`` (so proposing and cancelling in a loop fills nothing
        else). The total cap counts only proposals waiting for a funding, and when it is full, a
        client holding fewer than the client with the most takes the place of that client's oldest
        proposal not funded within ``proposal_grace_s`` (it lapses now, and counts against its own
        client's cap for the cooldown): a few addresses cannot lock everyone else out. The rows of
        ended proposals are kept for at most ``ENDED_PROPOSAL_ROWS`` times the total cap (the oldest
        are deleted first): a flood of proposals from many addresses cannot fill the database."""
        cfg = self.config
        self.store.lapse_proposals()
        now = time.time()
        own = self.store.count_unfunded(now - cfg.proposal_cooldown_s, client)
        if client is not None and own >= cfg.max_proposals_per_client:
            raise TooManyChannels("too many unfunded proposals from this client, try later")
        self.store.forget_ended_proposals(ENDED_PROPOSAL_ROWS * cfg.max_proposals)
        if self.store.count_proposals() < cfg.max_proposals:
            return
        waiting = self.store.count_unfunded(now + 1.0, client)  # (only those still waiting: none ended later)
        victim = self.store.evictable_proposal(now - cfg.proposal_grace_s, waiting + 1)
        if victim is None or not self.store.end_proposal(victim, "lapsed"):
            raise TooManyChannels("too many unfunded proposals, try later")

    async def register_funding(self, cid: str, body: dict[str, Any], client: str | None = None) -> dict[str, Any]:
        """``POST /v1/channels/{id}/funding``: check the outpoint on the node and record it. With a
        ``proposal_token`` (a stateless proposal) the channel's row is written now, in one statement;
        ``client``: the reporter's address (kept with such a row, for the per-client credit cap)."""
        txid = txid_field(body, "txid")
        vout = int_field(body, "vout", 0, 100_000)
        token = None
        if "proposal_token" in body:
            token = ProposalToken.decode(body["proposal_token"], self._proposal_secrets()[1], self.config.network)
            if token.channel_id != cid:
                raise BadProposalToken("proposal_token is for another channel")
        rec = self.store.find(cid)
        if rec is None and token is not None:
            return await self._fund_stateless(token, txid, vout, client)
        if rec is None:
            raise UnknownChannel(f"no channel {cid}")
        if rec.state is not ChannelState.PROPOSED:
            if rec.funding_txid == txid and rec.funding_vout == vout:
                return channel_object(rec)  # idempotent retry
            if rec.state is ChannelState.FAILED:
                raise ChannelClosed("this proposal has lapsed")
            raise FundingMismatch("this channel already has a funding outpoint")
        info, inputs = await self._check_funding(self.params_of(rec), txid, vout)
        if not self.store.set_funding(cid, txid, vout, info.confirmations, inputs):
            return channel_object(self.store.get(cid))
        if info.confirmations >= self.config.min_confirmations:
            self.store.set_confirmations(cid, info.confirmations, open_now=True)
        self.invalidate(cid)
        return channel_object(self.store.get(cid))

    async def _check_funding(self, params: ChannelParams, txid: str, vout: int) -> tuple[TxOutInfo, list[list[Any]]]:
        """The output ``txid:vout`` as the node sees it (mempool included) and the outpoints its
        transaction spends; ``FundingNotFound``/``FundingMismatch`` unless it pays exactly the
        deposit to the funding script and is not a coinbase's."""
        info = await self.node.get_txout(OutPoint(txid, vout), include_mempool=True)
        if info is None:
            raise FundingNotFound("no such unspent output (mempool or chain)")
        if info.value_sat != params.deposit_sat or info.script != params.funding_script:
            raise FundingMismatch("the output does not pay exactly deposit_sat to funding_script")
        if info.coinbase:
            # unspendable for 100 blocks: the payee could not close before the payer's refund is valid
            raise FundingMismatch("a coinbase output cannot fund a channel")
        inputs: list[list[Any]] = []
        tx = await self.node.get_transaction(txid)
        if tx is not None:
            inputs = [[i["txid"], i["vout"]] for i in tx.get("vin", []) if "txid" in i]
        return info, inputs

    async def _fund_stateless(self, token: ProposalToken, txid: str, vout: int, client: str | None) -> dict[str, Any]:
        """The first funding report of a stateless proposal (its token checked): refused
        ``channel_closed`` once the token is older than ``proposal_ttl_s``; then the node's checks,
        and the channel's row written directly in ``funding`` (``open`` when deep enough) under the
        token's agreed terms, whatever the payee's configuration is now. A report racing another
        (another instance, a retry) writes once: :meth:`PayeeStore.insert_funded`."""
        cfg = self.config
        if time.time() - token.issued_at > cfg.proposal_ttl_s:
            raise ChannelClosed("this proposal has lapsed")
        params = self._stateless_params(token)
        info, inputs = await self._check_funding(params, txid, vout)
        # the row's first state is the core's: a proposal (kept by the payer) that saw its funding,
        # and, deep enough already, its confirmation
        life = PayeeLifecycle(token.channel_id)
        life.funding_seen(OutPoint(txid, vout), info.confirmations, inputs)
        if info.confirmations >= cfg.min_confirmations:
            life.funding_confirmed(info.confirmations)
        terms = token.terms
        rec = self.store.insert_funded(
            PayeeRecord(
                channel_id=token.channel_id,
                state=life.state,
                params=params.to_json(),
                privkey=derive_stateless_key(self._proposal_secrets()[0], token.channel_id),
                deposit_sat=token.deposit_sat,
                expiry_height=token.expiry_height,
                created_at=float(token.issued_at),
                funding_txid=txid,
                funding_vout=vout,
                confirmations=info.confirmations,
                funding_inputs=inputs,
                max_units=terms.max_units,
                max_total_sat=terms.max_total_sat,
                created_height=token.created_height,
                terms=terms.to_json(),
                payout_script=self.closer.payee_script.hex() or None,
                client=client,
                key_index=None,  # derived from the seed and the channel id
            )
        )
        self.invalidate(token.channel_id)
        return channel_object(rec)

    # -- payments ----------------------------------------------------------------
    @staticmethod
    def _state_error(rec: PayeeRecord) -> ChannelError:
        return not_open_error(ChannelState(rec.state))

    def authenticate(self, rec: PayeeRecord, auth: RequestAuth, request: PaidRequest) -> tuple[bytes, bool]:
        """A metered request's ``X-Btcchannel-Auth``: ``Unauthorized`` unless signed by the channel's
        payer (auth v2: over channel, counter, method, authority, target, body digest and payment
        headers; v1, only for a request without a body: channel, counter, method, target) with a
        counter above the last one stored, or exactly the last charged request again (same counter,
        same signed request, same payment). Returns (the request's idempotency key, whether it is
        that exact retry: served again, not charged). A counter not above the stored one is refused
        naming the last counter accepted, so that the payer can resync."""
        cid = rec.channel_id
        if auth.version == 1 and request.body_sha256 != EMPTY_BODY_SHA256:
            raise Unauthorized("a request with a body needs auth v2 (a v1 signature does not cover the body)")
        digest = request.digest(cid, auth)
        if not self.channels.get(cid).verify_payer_digest(digest, auth.signature):
            raise Unauthorized("the request is not signed by this channel's payer")
        key = request.key(digest)
        if auth.counter == rec.request_counter and rec.last_request is not None and rec.last_request == key:
            return key, True
        if auth.counter <= rec.request_counter:
            raise Unauthorized(
                f"request counter {auth.counter} is not above {rec.request_counter}", last_counter=rec.request_counter
            )
        return key, False

    def exact_retry(self, cid: str, amount: int, sig: bytes) -> PayeeRecord | None:
        """The channel's row if it holds exactly this payment (an exact retry, answered in any state)."""
        rec = self.store.find(cid)
        if rec is not None and rec.amount_sat == amount and rec.signature == sig:
            return rec
        return None

    async def accept(
        self,
        cid: str,
        amount_sat: int,
        signature: bytes,
        *,
        units_delta: int = 0,
        owed_sat: int | None = None,
        request_counter: int = 0,
        last_request: bytes | None = None,
    ) -> PayeeRecord | None:
        """Check with the core, durably store, then commit a payment: the stored row, or None for an
        exact retry.

        The core's :meth:`~btcchannel.core.channel.PayeeChannel.check_payment` changes nothing;
        the row is committed through the store's group commit (in one transaction with the other
        payments waiting then) before the payment is committed to the channel's machine
        (:meth:`~btcchannel.core.channel.PayeeChannel.commit_payment`): a write that fails leaves
        the machine as it was. The event loop never waits on the disk. An exact retry of a payment
        whose commit is still under way waits for that commit, so its answer carries the amount it
        repeats. A lost compare-and-set (the row changed under us) is decided again on the stored
        row. Raises the core's errors. The caller has checked the chain view
        (:meth:`require_fresh_chain`) once for the request."""
        for _attempt in range(3):
            ch = self.channel(cid)
            if ch.state != ChannelState.OPEN:
                raise self._state_error(self.store.get(cid))
            payment = ch.check_payment(amount_sat, signature, tip_height=self.tip_height)
            pending = self._pending.get(cid)
            if payment is None or (pending is not None and pending[0] == payment):
                if pending is not None:  # the same payment being stored: its outcome is the first request's
                    await asyncio.wait([pending[1]])
                return None
            fut = asyncio.ensure_future(
                self.store.record_payment_async(
                    cid,
                    amount_sat,
                    signature,
                    units_delta=units_delta,
                    owed_sat=owed_sat,
                    request_counter=request_counter,
                    last_request=last_request,
                )
            )
            self._pending[cid] = (payment, fut)
            try:
                stored = await fut  # a failed write raises here: nothing was committed to the machine
            finally:
                if self._pending.get(cid, (None, None))[1] is fut:
                    del self._pending[cid]
            if stored is not None:
                ch.commit_payment(payment)
                self.channels.remember(stored)
                return stored
            # the row changed under us (another process, a close): decide again on fresh data
            self.invalidate(cid)
            rec = self.store.get(cid)
            if rec.state is not ChannelState.OPEN:
                raise self._state_error(rec)
            if request_counter and rec.request_counter >= request_counter:
                raise Unauthorized(
                    f"request counter {request_counter} is already used", last_counter=rec.request_counter
                )
        raise InternalError("payment could not be stored (concurrent updates)")

    def verify_only(self, rec: PayeeRecord, amount_sat: int, signature: bytes) -> None:
        """Check a payment's signature and range without storing it (for wrong-amount handling)."""
        self.build_channel(rec).verify_payment(amount_sat, signature)

    def end_condition(self, rec: PayeeRecord) -> str | None:
        """The agreed end condition a channel has reached, if any (checked after each payment):
        the metering's (unit count, agreed total, capacity), then the agreed number of payments
        (``payment_count_reached``) and the agreed end time (``end_time_reached``)."""
        terms = self.terms_of(rec)
        reason = terms.metering.end_condition(
            units=rec.units,
            max_units=terms.max_units,
            paid_sat=rec.amount_sat,
            owed_sat=rec.owed_sat,
            max_total_sat=terms.max_total_sat,
            deposit_sat=rec.deposit_sat,
            capacity=lambda: self.capacity_of(rec),
        )
        if reason is None and terms.max_payments is not None and rec.payments >= terms.max_payments:
            reason = "payment_count_reached"
        if reason is None and terms.end_time is not None and time.time() >= terms.end_time:
            reason = "end_time_reached"
        return reason

    def capacity_of(self, rec: PayeeRecord) -> Capacity:
        """Which cumulative amounts the channel can carry (the core's dust rule; kept per channel:
        its parameters never change)."""
        cap = self._capacity.get(rec.channel_id)
        if cap is None:
            cap = self._capacity[rec.channel_id] = ChannelParams.from_json(rec.params).capacity
        return cap

    def can_pay(self, rec: PayeeRecord, amount_sat: int) -> bool:
        """Whether the channel can carry a payment of ``amount_sat`` (the core's dust rule)."""
        return self.capacity_of(rec).carries(amount_sat)

    async def after_payment(self, rec: PayeeRecord) -> PayeeRecord:
        """Check end conditions on a freshly stored row; start the close if one is met."""
        reason = self.end_condition(rec)
        if reason is not None:
            claimed = await self.closer.claim_async(rec.channel_id, reason, rec)
            if claimed is not None:
                return claimed
        return rec

    async def _stored(self, cid: str, rec: PayeeRecord | None, amount: int, sig: bytes) -> PayeeRecord:
        """The row after ``accept``: the one it stored, or, after an exact retry, the current one only
        if it still holds exactly that payment (another process may have stored a higher one since:
        then the retry is ``stale_payment``, never answered with an amount it did not send)."""
        if rec is None:
            rec = self.store.get(cid)
            if rec.amount_sat != amount or rec.signature != sig:
                self.invalidate(cid)
                raise StalePayment(f"a higher payment ({rec.amount_sat} sat) is stored")
        return await self.after_payment(rec)

    def claim_close(self, cid: str, reason: str, rec: PayeeRecord | None = None) -> PayeeRecord | None:
        """Claim the close now (no more payments) and broadcast it in the background (``rec``: the
        row as last read, if the caller has it)."""
        return self.closer.claim(cid, reason, rec)

    async def pay(self, cid: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/channels/{id}/payments`` (plus the postpay rule when metered); the payment is
        stored through the group commit."""
        amount = int_field(body, "amount_sat", 1)
        sig = hex_field(body, "signature", 80)
        try:
            self.require_fresh_chain()  # once for the request: no payment is taken on a stale chain view
            if self.terms_for(cid).metering.settles_owed:
                rec = await self.pay_owed(self.store.get(cid), amount, sig)
            else:
                rec = await self._stored(cid, await self.accept(cid, amount, sig), amount, sig)
        except ChannelError:
            retried = self.exact_retry(cid, amount, sig)  # the stored payment again: its stored result,
            if retried is None:  # whatever the channel's state now
                raise
            rec = retried
        return {"channel_id": cid, "amount_sat": rec.amount_sat, "state": rec.state}

    async def pay_owed(self, rec: PayeeRecord, amount: int, sig: bytes) -> PayeeRecord:
        """Postpay: the payment must be exactly the owed total; anything else ends the channel. The
        caller has checked the chain view."""
        cid = rec.channel_id
        if rec.state is not ChannelState.OPEN:
            raise self._state_error(rec)
        try:
            settles = Metering.check_settlement(rec.owed_sat, rec.amount_sat, amount)
        except WrongAmount:
            self.verify_only(rec, amount, sig)  # a forged request must not end the channel
            await self.closer.claim_async(cid, "wrong_amount")
            raise
        # not settling: an exact retry (or a stale or forged payment, which accept refuses)
        stored = await self.accept(cid, amount, sig, owed_sat=amount if settles else None)
        return await self._stored(cid, stored, amount, sig)

    async def charge_prepay(
        self, rec: PayeeRecord, amount: int, sig: bytes, units: int = 1, counter: int = 0, key: bytes | None = None
    ) -> PayeeRecord:
        """Prepay: store the payment covering ``units`` more units (exactly previous total + price*units)
        for the request ``counter`` (idempotency key ``key``). The caller has checked the chain view
        (a stale view never ends a channel for a wrong amount)."""
        cid = rec.channel_id
        if rec.state is not ChannelState.OPEN:
            raise self._state_error(rec)
        terms = self.terms_of(rec)
        Metering.check_units(rec.units, terms.max_units, units)
        try:
            terms.metering.check_prepay(rec.amount_sat, amount, units)
        except WrongAmount:
            fresh = self.store.get(cid)  # ``rec`` may be the kept row: never end a channel on a stale one
            if (fresh.amount_sat, fresh.units, fresh.state) != (rec.amount_sat, rec.units, rec.state):
                self.invalidate(cid)
                return await self.charge_prepay(fresh, amount, sig, units, counter, key)
            self.verify_only(rec, amount, sig)  # a forged request must not end the channel
            await self.closer.claim_async(cid, "wrong_amount")
            raise
        stored = await self.accept(cid, amount, sig, units_delta=units, request_counter=counter, last_request=key)
        if stored is None:
            raise StalePayment("payment already used")
        return stored

    async def charge_postpay(
        self, rec: PayeeRecord, units: int = 1, counter: int = 0, key: bytes | None = None
    ) -> PayeeRecord | None:
        """Postpay: serve ``units`` on credit if the unpaid total stays within the channel's limit
        (None if not) and the outstanding credit across channels within the payee's caps
        (``CreditCapReached`` if not). ``counter``: the authenticated request's; a request whose
        counter is not above the stored one (a replay racing its original) is ``Unauthorized``. The
        caller has checked the chain view."""
        cid = rec.channel_id
        caps = self.credit_caps(rec)
        for _attempt in range(5):
            if rec.state is not ChannelState.OPEN:
                raise self._state_error(rec)
            terms = self.terms_of(rec)
            Metering.check_units(rec.units, terms.max_units, units)
            new_owed = terms.metering.credit(rec.owed_sat, rec.amount_sat, units, self.capacity_of(rec))
            if new_owed is None:
                return None
            stored = await self.store.record_credit_async(
                cid, rec.owed_sat, new_owed, units, counter, last_request=key, caps=caps
            )
            if stored is not None:
                self.channels.remember(stored)
                return stored
            self.channels.forget_row(cid)  # the kept row was behind: decide again on the stored one
            rec = self.store.get(cid)
            if counter and rec.request_counter >= counter:
                raise Unauthorized(f"request counter {counter} is already used", last_counter=rec.request_counter)
            if caps:
                self._check_caps(rec, new_owed, caps)  # refused by a cap (not a race): say which
        raise InternalError("credit could not be stored (concurrent updates)")

    def credit_caps(self, rec: PayeeRecord) -> list[tuple[str | None, Any, int]]:
        """The configured caps on outstanding postpay credit that apply to ``rec``'s payer, as
        (column, value, limit): per payer key, per client address, in total."""
        cfg = self.config
        caps: list[tuple[str | None, Any, int]] = []
        if cfg.credit_cap_per_payer_sat is not None:
            caps.append(
                ("payer_pubkey", rec.payer_pubkey or rec.params.get("payer_pubkey"), cfg.credit_cap_per_payer_sat)
            )
        if cfg.credit_cap_per_client_sat is not None and rec.client is not None:
            caps.append(("client", rec.client, cfg.credit_cap_per_client_sat))
        if cfg.credit_cap_total_sat is not None:
            caps.append((None, None, cfg.credit_cap_total_sat))
        return caps

    def _check_caps(self, rec: PayeeRecord, new_owed: int, caps: list[tuple[str | None, Any, int]]) -> None:
        """CreditCapReached if serving up to ``new_owed`` on ``rec`` passes one of ``caps`` (the
        write's own guard refused it: say which)."""
        added = new_owed - Metering.owed_total(rec.owed_sat, rec.amount_sat)
        names = {"payer_pubkey": "this payer key's", "client": "this client's", None: "the payee's total"}
        for column, value, limit in caps:
            if self.store.outstanding_credit(column, value) + added > limit:
                raise CreditCapReached(
                    f"{names[column]} outstanding credit across channels would pass its cap of "
                    f"{limit} sat: settle what is owed on another channel first"
                )

    async def use_surplus(
        self, rec: PayeeRecord, units: int, counter: int, key: bytes | None = None
    ) -> PayeeRecord | None:
        """Prepay without a payment: serve ``units`` from the prepaid surplus, the paid total above
        what was served, whatever carried it (a payment on ``/payments``, or units whose handler
        failed); None if it is short (the request needs a payment)."""
        if rec.state is not ChannelState.OPEN:
            raise self._state_error(rec)
        terms = self.terms_of(rec)
        Metering.check_units(rec.units, terms.max_units, units)
        return self._kept(
            await self.store.use_surplus_async(rec.channel_id, units, terms.metering.price_sat, counter, key)
        )

    async def unserve(self, rec: PayeeRecord, units: int, key: bytes | None = None) -> None:
        """A charged request whose handler failed: not charged after all. Prepay: what was paid for
        its units is surplus, the next requests' credit; postpay: the owed total goes back down."""
        metering = self.terms_of(rec).metering
        self.channels.forget_row(rec.channel_id)  # units and the owed total go back: read the row afresh
        await self.store.unserve_async(
            rec.channel_id, units, metering.cost(units) if metering.mode == "postpay" else 0, key
        )
        self.channels.forget_row(rec.channel_id)

    def close_request(self, cid: str, body: dict[str, Any]) -> PayeeRecord:
        """``POST /v1/channels/{id}/close``: the payer's signed close request."""
        sig = hex_field(body, "signature", 80)
        rec = self.store.get(cid)
        ch = self.build_channel(rec)
        ch.verify_close_request(cid, sig)
        if rec.state is ChannelState.PROPOSED and not self.store.end_proposal(cid, "cancelled_by_payer"):
            rec = self.store.get(cid)  # funded (or lapsed) meanwhile: decided again
        if rec.state in (ChannelState.OPEN, ChannelState.FUNDING):
            self.claim_close(cid, "payer_request", rec)
        return self.store.get(cid)

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``."""
        cfg = self.config
        return {
            "version": 1,
            "network": cfg.network,
            "tip_height": self.tip_height,
            "min_deposit_sat": cfg.min_deposit_sat,
            "max_deposit_sat": cfg.max_deposit_sat,
            "min_lifetime_blocks": cfg.min_lifetime_blocks,
            "max_lifetime_blocks": cfg.max_lifetime_blocks,
            "close_margin_blocks": cfg.close_margin_blocks,
            "min_confirmations": cfg.min_confirmations,
            "price_sat": cfg.price_sat,
            "mode": cfg.mode,
            "credit_limit_sat": cfg.credit_limit_sat,
            "terms": cfg.terms.required().to_json(),
            "script_versions": list(script.SCRIPT_VERSIONS),
            "revision": 2,
            "auth_versions": [1, 2],
            "proposal_ttl_s": cfg.proposal_ttl_s,
            "max_proposals": cfg.max_proposals,
            "max_proposals_per_client": cfg.max_proposals_per_client,
            "proposal_cooldown_s": cfg.proposal_cooldown_s,
            "stateless_proposals": True,
            "credit_cap_per_payer_sat": cfg.credit_cap_per_payer_sat,
            "credit_cap_per_client_sat": cfg.credit_cap_per_client_sat,
            "credit_cap_total_sat": cfg.credit_cap_total_sat,
            "final_confirmations": cfg.final_confirmations,
            **self.chain_view(),
        }

    def chain_view(self) -> dict[str, Any]:
        """How fresh the payee's view of the chain is (part of ``/v1/info``)."""
        reason = self.tip.stale_reason(self.config.max_tip_age_s)
        age = self.tip.age_s()
        return {
            "chain_fresh": reason is None,
            "chain_problem": reason,
            "tip_age_s": None if age is None else round(age, 3),
            "max_tip_age_s": self.config.max_tip_age_s,
        }
