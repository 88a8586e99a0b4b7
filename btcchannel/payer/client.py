"""The payer's client: opens, funds, pays, closes and refunds channels over HTTP.

Entry points (what the CLI calls)::

    class PayerClient:
        def __init__(self, datadir: str | os.PathLike[str], node: Node, *, network: str = "regtest",
                     timeout: float = 30.0, fee_rate_sat_vb: float | None = None,
                     open_poll_s: float = 0.2) -> None
        async def aclose(self) -> None                      # also: async with PayerClient(...) as c
        async def info(self, server_url: str) -> dict[str, Any]
        async def open_channel(self, server_url: str, deposit_sat: int, lifetime_blocks: int, *,
                               wait_open: bool = True, open_timeout: float = 600.0,
                               max_units: int | None = None, max_total_sat: int | None = None,
                               limits: PayerLimits | None = None, script_version: int | None = None,
                               payer_address: str | None = None) -> str
        async def propose(...same, without waiting...) -> str     # proposed and stored, not funded
        async def wait_open(self, channel_id: str, timeout: float = 600.0) -> dict[str, Any]
        async def pay(self, channel_id: str, increment: int | None = None, *,
                      amount: int | None = None) -> int          # returns the acknowledged total
        async def sign_next(self, channel_id: str, amount: int, *, units_ahead: int = 0) -> Payment
                                                             # checked against the terms, stored, not sent
        def terms(self, channel_id: str) -> Terms | None     # the terms agreed at open
        def request_auth(self, channel_id, method, url, body=None, payment_headers=None) -> str  # X-Btcchannel-Auth v2
        async def resume(self, channel_id: str) -> dict[str, Any]    # reconcile with the payee
        async def status(self, channel_id: str) -> dict[str, Any]    # GET /v1/channels/{id}
        async def close(self, channel_id: str) -> dict[str, Any]     # signed close request
        async def refund(self, channel_id: str, *, fee_rate_sat_vb=None, dest_address=None) -> str  # txid
        async def refund_details(...same...) -> dict[str, Any]   # txid, amount, fee, fee rate
        refunds: Refunds                                # the refund component both call (payer/refund.py)
        async def refresh(self) -> int                  # every channel up to the chain's and the payee's view
        def channel_for(self, url: str) -> str          # the open/funding channel to url's payee (local view)
        async def pick_channel(self, url: str) -> str   # a usable channel, asking the payee (NotOpen: why none)
        async def get_object(self, url: str) -> dict[str, Any]   # GET JSON outside the protocol
        def list(self) -> list[PayerRecord]; export_backup(self) -> dict; import_backup(self, data) -> int

The payer's state lives in ``<datadir>/payer.db`` (``PayerStore``). A payment
is signed, **stored**, and only then sent; after a crash ``resume`` re-sends
the stored payment if the payee has not acknowledged it, so the payer never
signs a lower amount than one it may have handed out. Every HTTP call has a
timeout; a payee that cannot be reached raises ``PayeeUnreachable`` (never
``NodeUnavailable``, which is about the bitcoind); the payee's error codes come
back as the typed errors of ``btcchannel.errors``; an answer that contradicts
the protocol raises ``ProtocolViolation``. Each state the payee reports is stepped
through the core's transition table (:mod:`btcchannel.payer.reported`): a report
the table does not lead to from the stored state is logged and ignored.

A payee whose ``/v1/info`` offers ``stateless_proposals`` is asked for one (unless
``stateless_proposals`` is set False on the client): it stores nothing until the funding is
reported, and the answer's ``proposal_token`` is stored with the channel and sent with every
funding report, the one after a restart included. Until then the payee does not know the channel:
:meth:`PayerClient.status` answers from the local row (``proposed``; ``failed``, ``lapsed`` once the
token's time is over, counted on the payer's clock from before it proposed), or reports the stored
funding again when the first report was lost; :meth:`PayerClient.close` cancels such a proposal
locally.

The terms are agreed at open: the payer reads the payee's required terms
(``GET /v1/info``), refuses them if they are outside its :class:`PayerLimits`
(``TermsRefused``, before anything is funded), proposes them with its end
conditions and refuses an answer that states other terms (``TermsChanged``).
From then on it signs only what the stored terms allow (``AmountNotAgreed``
otherwise): never above its own count of units received times the agreed
price (plus, in prepay, the units it is paying for), the agreed total, the
agreed number of payments or after the agreed end time. A later answer of
the payee cannot change them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping

import aiohttp
from yarl import URL

from btcchannel.bitcoind.errors import RpcInsufficientFunds
from btcchannel.bitcoind.rpc import Node
from btcchannel.core import keys, script
from btcchannel.core.channel import PayerChannel
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.proposal import MAX_TOKEN_CHARS
from btcchannel.core.state import ChannelState
from btcchannel.core.terms import PayerLimits, Terms, not_open_error
from btcchannel.core.tx import OutPoint
from btcchannel.errors import (
    BadRequest,
    ChannelError,
    ExpiryOutOfRange,
    FundingNotFound,
    InsufficientFunds,
    MeteredChannel,
    OpenTimeout,
    ProtocolViolation,
    StalePayment,
    TermsChanged,
    UnknownChannel,
    WrongNetwork,
)
from btcchannel.payer.http import PayeeHttp
from btcchannel.payer.refund import Refunds
from btcchannel.payer.reported import state_after_report
from btcchannel.payer.views import (
    Progress,
    check_payee_url,
    mempool_fee,
    no_progress,
    none_usable,
    payee_unreachable,
    refresh_from_chain,
    to_payee,
)
from btcchannel.store import PayerRecord, PayerStore
from btcchannel.store.ops import write_payer_backup
from btcchannel.wire import auth_header_v2

__all__ = ["PayerClient", "Progress", "payee_unreachable"]

_BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class PayerClient(PayeeHttp):
    """The payer: one datadir (its ``payer.db``) and one node wallet that funds channels."""

    def __init__(
        self,
        datadir: str | os.PathLike[str],
        node: Node,
        *,
        network: str = "regtest",
        timeout: float = 30.0,
        fee_rate_sat_vb: float | None = None,
        backup_file: str | os.PathLike[str] | None = None,
        open_poll_s: float = 0.2,
    ) -> None:
        self.datadir = Path(datadir)
        self.node = node
        self.network = script.check_network(network)
        self.timeout = timeout
        self.fee_rate_sat_vb = fee_rate_sat_vb
        self.backup_file = Path(backup_file) if backup_file is not None else None  # rewritten on every open
        self.open_poll_s = open_poll_s  # how often wait_open asks the payee
        self.store = PayerStore(self.datadir / "payer.db")
        if self.store.has_seed():
            self.store.restore_keys()  # a key lost from the row is re-derived (and checked) from the seed
        #: the way back to a deposit after expiry (:meth:`refund` and :meth:`refund_details` use it)
        self.refunds = Refunds(self.store, node, self.network, self.record)
        self._session: aiohttp.ClientSession | None = None
        self._signing: dict[str, asyncio.Lock] = {}  # per channel: choose, sign and store one amount at a time
        self._open: dict[str, PayerChannel] = {}  # open channels' machines, valid while they match the row
        self._terms: dict[str, Terms] = {}  # agreed terms, parsed
        self._keys: dict[str, bytes] = {}  # channel keys (never change once stored)
        self._needed: dict[str, int] = {}  # confirmations each payee asks for (from its info)
        #: ask payees that offer them for stateless proposals (False: always a stored proposal)
        self.stateless_proposals = True

    async def __aenter__(self) -> PayerClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session and the store."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.store.close()

    # -- channels ---------------------------------------------------------------------
    def _channel(self, rec: PayerRecord) -> PayerChannel:
        """The pure channel machine of a stored record."""
        params = ChannelParams.from_json(rec.params)
        if params.funding is None and rec.funding_txid is not None and rec.funding_vout is not None:
            params = params.with_funding(OutPoint(rec.funding_txid, rec.funding_vout))
        payment = Payment(rec.amount_sat, rec.signature) if rec.signature is not None else None
        state = ChannelState(rec.state) if params.funding is not None else ChannelState.PROPOSED
        return PayerChannel.restore(params, rec.privkey, state, payment)

    def _current(self, rec: PayerRecord) -> PayerChannel:
        """The channel's machine: the cached one while it matches the stored row, else rebuilt (and checked)."""
        ch = self._open.get(rec.channel_id)
        if (
            ch is None
            or ch.state is not rec.state
            or ch.amount_sat != rec.amount_sat
            or (ch.payment.signature if ch.payment else None) != rec.signature
        ):
            ch = self._channel(rec)
            self._open[rec.channel_id] = ch
        return ch

    def record(self, channel_id: str, rec: PayerRecord | None = None) -> PayerRecord:
        """The stored channel (``rec``: as the caller just read it), refused (``UnknownChannel``) when it
        belongs to another network."""
        rec = self.store.get(channel_id) if rec is None else rec
        network = rec.params.get("network")
        if network != self.network:
            raise UnknownChannel(f"channel {channel_id} is a {network} channel, and this client runs on {self.network}")
        return rec

    def _url(self, rec: PayerRecord, suffix: str = "") -> str:
        return f"{rec.server_url.rstrip('/')}/v1/channels/{rec.channel_id}{suffix}"

    async def open_channel(
        self,
        server_url: str,
        deposit_sat: int,
        lifetime_blocks: int,
        *,
        wait_open: bool = True,
        open_timeout: float = 600.0,
        max_units: int | None = None,
        max_total_sat: int | None = None,
        limits: PayerLimits | None = None,
        progress: Progress | None = None,
        script_version: int | None = None,
        payer_address: str | None = None,
    ) -> str:
        """Propose, check, fund and register a channel; returns its id.

        The payee's required terms are checked against ``limits`` (``TermsRefused``)
        and proposed with the limits' end conditions (``max_units`` and ``max_total_sat``
        add to them). The payee's answer is checked against the witness script
        recomputed from both keys and the expiry, and its terms against the
        proposed ones; any difference raises ``ProtocolViolation`` (or
        ``TermsChanged``) before a satoshi is spent. A payee on another network raises
        ``WrongNetwork``, a lifetime outside the payee's range ``ExpiryOutOfRange`` (both before
        anything is stored), a wallet that cannot pay ``InsufficientFunds`` (the proposal's row is
        removed: nothing was sent). With ``wait_open`` it waits
        (up to ``open_timeout`` s) for the payee to report ``open`` (``OpenTimeout``
        after that: the channel stays funded and opens later). ``progress`` hears
        each step (see :data:`Progress`). ``script_version`` and ``payer_address``: see :meth:`propose`.
        """
        report = progress or no_progress
        cid = await self.propose(
            server_url,
            deposit_sat,
            lifetime_blocks,
            max_units=max_units,
            max_total_sat=max_total_sat,
            limits=limits,
            progress=report,
            script_version=script_version,
            payer_address=payer_address,
        )
        params = ChannelParams.from_json(self.store.get(cid).params)
        try:
            outpoint = await self.node.fund_output(
                params.funding_script, deposit_sat, fee_rate_sat_vb=self.fee_rate_sat_vb
            )
        except RpcInsufficientFunds as exc:
            # the wallet refused to build the transaction: nothing exists to refund, no row is kept
            self.store.delete(cid)
            raise InsufficientFunds(
                f"the wallet cannot fund a deposit of {deposit_sat} sat plus fees ({exc.message})"
            ) from exc
        except BaseException:
            self.store.set_state(cid, ChannelState.FAILED)  # maybe sent: kept (failed) until `forget`
            raise
        self.record_funding(cid, outpoint)
        report(
            "funded", {"channel_id": cid, "funding_txid": outpoint.txid, **await mempool_fee(self.node, outpoint.txid)}
        )
        await self._register_funding(cid)
        if wait_open:
            await self.wait_open(cid, open_timeout, progress=report)
        return str(cid)

    async def propose(
        self,
        server_url: str,
        deposit_sat: int,
        lifetime_blocks: int,
        *,
        max_units: int | None = None,
        max_total_sat: int | None = None,
        limits: PayerLimits | None = None,
        progress: Progress | None = None,
        script_version: int | None = None,
        payer_address: str | None = None,
    ) -> str:
        """Propose a channel, check the answer and store it (state ``proposed``, key backed up); its id.

        Nothing is funded: :meth:`open_channel` funds from the node wallet,
        :mod:`btcchannel.payer.external` from any other wallet. ``script_version``: the channel
        script to ask for (default: the descriptor script when the payee's ``/v1/info`` lists it in
        ``script_versions``, else the legacy one; a version the payee does not list is
        BadRequest). ``payer_address``: where the payer's change and refund go (default: a new
        address of the node wallet).
        """
        report = progress or no_progress
        check_payee_url(server_url)
        info = await self.info(server_url)
        if info.get("network") != self.network:
            raise WrongNetwork(
                f"the payee at {server_url} runs on {info.get('network')}, and this payer on {self.network}"
            )
        low, high = info.get("min_lifetime_blocks"), info.get("max_lifetime_blocks")
        if isinstance(low, int) and isinstance(high, int) and not low <= lifetime_blocks <= high:
            raise ExpiryOutOfRange(
                f"a lifetime of {lifetime_blocks} blocks is outside the payee's range: {low} to {high} blocks"
            )
        offered = info.get("script_versions")
        offered = offered if isinstance(offered, list) else [script.SCRIPT_LEGACY]
        if script_version is None:
            script_version = script.SCRIPT_DESCRIPTOR if script.SCRIPT_DESCRIPTOR in offered else script.SCRIPT_LEGACY
        elif script.check_script_version(script_version) not in offered:
            raise BadRequest(f"the payee does not offer script version {script_version} (it offers {offered})")
        limits = limits or PayerLimits()
        if max_units is not None or max_total_sat is not None:
            limits = replace(
                limits,
                max_units=max_units if max_units is not None else limits.max_units,
                max_total_sat=max_total_sat if max_total_sat is not None else limits.max_total_sat,
            )
        terms = limits.accept(self._required_terms(info))
        tip = await self.node.tip_height()
        expiry = tip + lifetime_blocks
        payer_script = script.address_to_script(payer_address or await self.node.new_address(), self.network)
        key_index, privkey = self.store.reserve_key()  # committed before the key is used: never reused
        pubkey = keys.public_key(privkey)
        body: dict[str, Any] = {
            "payer_pubkey": pubkey.hex(),
            "deposit_sat": deposit_sat,
            "expiry_height": expiry,
            "payer_script": payer_script.hex(),
        }
        if script_version != script.SCRIPT_LEGACY:  # a payee from before script versions is never asked
            body["script_version"] = script_version
        stateless = self.stateless_proposals and info.get("stateless_proposals") is True
        if stateless:  # a payee from before stateless proposals is never asked (it refuses unknown fields)
            body["stateless"] = True
        ttl = info.get("proposal_ttl_s")
        asked_at = time.time()  # before the token is issued: the payer's lapse is never after the payee's
        legacy = "terms" not in info  # a payee from before agreed terms: the old end-condition fields
        if legacy:
            body.update(
                {
                    k: v
                    for k, v in (("max_units", terms.max_units), ("max_total_sat", terms.max_total_sat))
                    if v is not None
                }
            )
        else:
            body["terms"] = terms.to_json()
        _, ans = await self.request("POST", f"{server_url.rstrip('/')}/v1/channels", body)
        params = self._check_proposal(ans, pubkey, payer_script, deposit_sat, expiry, script_version)
        if not legacy and ans.get("terms") != terms.to_json():
            raise TermsChanged(f"the payee answered other terms than proposed: {ans.get('terms')!r}; not funding")
        cid = str(ans["channel_id"])
        token = self._proposal_token(ans) if stateless else None
        expires = asked_at + ttl if token is not None and isinstance(ttl, (int, float)) else None
        self._needed[cid] = int(info.get("min_confirmations") or 1)
        self.store.insert(
            PayerRecord(
                channel_id=cid,
                server_url=server_url,
                state=ChannelState.PROPOSED,
                params=params.to_json(),
                privkey=privkey,
                deposit_sat=deposit_sat,
                expiry_height=expiry,
                terms=terms.to_json(),
                key_index=key_index,
                proposal_token=token,
                proposal_expires_at=expires,
            )
        )
        if self.backup_file is not None:  # the key is backed up before a satoshi is sent to it
            write_payer_backup(self.store.export_backup(), self.backup_file)
        report(
            "proposed",
            {
                "channel_id": cid,
                "deposit_sat": deposit_sat,
                "expiry_height": expiry,
                "funding_address": params.funding_address,
                "script_version": script_version,
            },
        )
        return cid

    def record_funding(self, channel_id: str, outpoint: OutPoint) -> None:
        """Store the funding outpoint of a proposed channel (state ``funding``); the payee is not told yet."""
        params = ChannelParams.from_json(self.store.get(channel_id).params).with_funding(outpoint)
        self.store.set_state(
            channel_id,
            ChannelState.FUNDING,
            funding_txid=outpoint.txid,
            funding_vout=outpoint.vout,
            params=params.to_json(),
        )

    async def register_funding(self, channel_id: str, patience: float = 15.0) -> dict[str, Any]:
        """Tell the payee the stored funding outpoint (retrying ``funding_not_found`` for ``patience`` s)."""
        return await self._register_funding(channel_id, patience)

    def terms(self, channel_id: str) -> Terms | None:
        """The terms agreed at open (None for a channel stored before terms were)."""
        rec = self.store.get(channel_id)
        return Terms.from_json(rec.terms) if rec.terms is not None else None

    @staticmethod
    def _proposal_token(ans: dict[str, Any]) -> str | None:
        """The ``proposal_token`` of a stateless proposal's answer (None: the payee stored the proposal
        instead); ``ProtocolViolation`` unless it is a base64url string."""
        token = ans.get("proposal_token")
        if token is None:
            return None
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS or token.strip(_BASE64URL) != "":
            raise ProtocolViolation("the proposal answer's proposal_token is not a base64url string")
        return token

    def _check_proposal(
        self, ans: Any, pubkey: bytes, payer_script: bytes, deposit_sat: int, expiry: int, script_version: int
    ) -> ChannelParams:
        want = {
            "channel_id",
            "payee_pubkey",
            "witness_script",
            "funding_address",
            "funding_script",
            "deposit_sat",
            "expiry_height",
        }
        if not isinstance(ans, dict) or not want <= set(ans):
            raise ProtocolViolation("the proposal answer lacks fields")
        cid = ans["channel_id"]
        if not isinstance(cid, str) or len(cid) != 32 or any(c not in "0123456789abcdef" for c in cid):
            raise ProtocolViolation("bad channel_id")
        try:
            payee_pubkey = keys.check_public_key(bytes.fromhex(ans["payee_pubkey"]))
            params = ChannelParams(
                network=self.network,
                payer_pubkey=pubkey,
                payee_pubkey=payee_pubkey,
                expiry_height=expiry,
                deposit_sat=deposit_sat,
                payer_script=payer_script,
                script_version=script_version,
            )
        except (ChannelError, TypeError, ValueError) as exc:
            raise ProtocolViolation(f"the payee's proposal is invalid: {exc}") from exc
        if ans.get("script_version", script.SCRIPT_LEGACY) != script_version:
            raise ProtocolViolation(
                f"asked for script version {script_version}, the payee answered "
                f"{ans.get('script_version')!r}: not funding"
            )
        if (
            ans["witness_script"] != params.witness_script.hex()
            or ans["funding_script"] != params.funding_script.hex()
            or ans["funding_address"] != params.funding_address
            or ans["deposit_sat"] != deposit_sat
            or ans["expiry_height"] != expiry
        ):
            raise ProtocolViolation("the payee's funding script differs from the one recomputed: not funding")
        return params

    async def _register_funding(self, cid: str, patience: float = 15.0) -> dict[str, Any]:
        rec = self.store.get(cid)
        deadline = time.monotonic() + patience
        report: dict[str, Any] = {"txid": rec.funding_txid, "vout": rec.funding_vout}
        if rec.proposal_token is not None:  # a stateless proposal: the payee writes the channel now
            report["proposal_token"] = rec.proposal_token
        while True:
            try:
                _, obj = await self.request("POST", self._url(rec, "/funding"), report)
                break
            except FundingNotFound:
                # the payee's node may not have seen our transaction yet (propagation)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        self._note_remote(rec, obj)
        return dict(obj)

    def _note_remote(self, rec: PayerRecord, obj: Any) -> None:
        if not isinstance(obj, dict) or obj.get("channel_id") != rec.channel_id:
            raise ProtocolViolation("the channel object names another channel")
        state = state_after_report(rec.state, obj.get("state"), rec.channel_id)  # stepped through the table
        if state is not None:
            fields: dict[str, Any] = {}
            if obj.get("close_txid"):
                fields["close_txid"] = obj["close_txid"]
            self.store.set_state(rec.channel_id, state, **fields)
        if rec.terms is not None and obj.get("terms") is not None and obj["terms"] != rec.terms:
            raise TermsChanged(f"the payee now states other terms than agreed: {obj['terms']!r}")
        amt = obj.get("amount_sat")
        if isinstance(amt, int) and not isinstance(amt, bool):
            if amt > rec.amount_sat:
                raise ProtocolViolation(f"the payee claims {amt} sat but we never signed more than {rec.amount_sat}")
            self.store.set_acked(rec.channel_id, amt)

    async def status(self, channel_id: str) -> dict[str, Any]:
        """The payee's channel object (and the local record updated from it).

        A stateless proposal the payee does not know (``unknown_channel``: it stores nothing before
        the funding report) is answered here: unfunded, with the local channel object (``proposed``,
        or ``failed``/``lapsed`` once its token has lapsed, which is then stored); funded, by
        reporting its funding again (a report lost to a crash), whose answer is the payee's object."""
        rec = self.record(channel_id)
        try:
            _, obj = await self.request("GET", self._url(rec))
        except UnknownChannel as exc:
            if rec.proposal_token is None or not exc.remote:
                raise
            if rec.funding_txid is not None:
                return await self._register_funding(channel_id)
            return self._unfunded_proposal(rec)
        self._note_remote(rec, obj)
        return dict(obj)

    def _unfunded_proposal(self, rec: PayerRecord, end_reason: str | None = None) -> dict[str, Any]:
        """The channel object of a stateless proposal without a funding, as this payer knows it (the
        payee holds nothing of it): ``proposed`` while its token is valid, else ``failed`` with
        ``end_reason`` (``lapsed`` when its token's time is over), recorded in the store."""
        lapsed = rec.proposal_expires_at is not None and time.time() >= rec.proposal_expires_at
        state = rec.state
        if end_reason is None and lapsed:
            end_reason = "lapsed"
        if end_reason is not None or state is ChannelState.FAILED:
            if state is not ChannelState.FAILED:
                self.store.set_state(rec.channel_id, ChannelState.FAILED)
            state = ChannelState.FAILED
        return {
            "channel_id": rec.channel_id,
            "state": state.value,
            "deposit_sat": rec.deposit_sat,
            "amount_sat": 0,
            "expiry_height": rec.expiry_height,
            "funding_txid": None,
            "funding_vout": None,
            "confirmations": 0,
            "close_txid": None,
            "units": 0,
            "owed_sat": 0,
            "end_reason": end_reason,
            "exception_txid": None,
            "terms": rec.terms,
        }

    async def wait_open(
        self, channel_id: str, timeout: float = 600.0, *, progress: Progress | None = None
    ) -> dict[str, Any]:
        """Poll the payee (every ``open_poll_s``) until the channel is ``open``.

        ``OpenTimeout`` after ``timeout`` s (saying how many confirmations the funding has);
        a channel that ended raises the payment errors' code for its state (``not_open``,
        ``channel_closing``, ``channel_closed``). ``progress`` hears ``confirmations`` whenever
        the count changes, then ``open``.
        """
        report = progress or no_progress
        deadline = time.monotonic() + timeout
        seen: int | None = -1
        needed = self._needed.get(channel_id, 1)
        while True:
            obj = await self.status(channel_id)
            if obj["state"] == ChannelState.OPEN:
                report("open", {"channel_id": channel_id})
                return obj
            if obj["state"] not in (ChannelState.PROPOSED, ChannelState.FUNDING):
                raise not_open_error(ChannelState(obj["state"]))
            txid = self.store.get(channel_id).funding_txid
            confs = await self.node.tx_confirmations(txid) if txid else None
            if confs != seen:
                seen = confs
                report(
                    "confirmations",
                    {"channel_id": channel_id, "funding_txid": txid, "confirmations": confs or 0, "needed": needed},
                )
            if time.monotonic() > deadline:
                raise OpenTimeout(
                    f"channel {channel_id} is funded by {txid} but not open after {timeout:g} s "
                    f"({confs or 0} of {needed} confirmations)"
                )
            await asyncio.sleep(self.open_poll_s)

    def _agreed(self, rec: PayerRecord) -> Terms:
        """``rec``'s agreed terms (stored at open, never changed), parsed once per channel."""
        assert rec.terms is not None
        terms = self._terms.get(rec.channel_id)
        if terms is None:
            terms = self._terms[rec.channel_id] = Terms.from_json(rec.terms)
        return terms

    def _lock(self, channel_id: str) -> asyncio.Lock:
        lock = self._signing.get(channel_id)
        if lock is None:
            lock = self._signing[channel_id] = asyncio.Lock()
        return lock

    async def sign_next(
        self, channel_id: str, amount: int, *, units_ahead: int = 0, record: PayerRecord | None = None
    ) -> Payment:
        """Sign cumulative ``amount`` and store it durably (not sent). Used by ``pay`` and metered.

        ``AmountNotAgreed`` if the agreed terms do not allow it, given the units received so far
        and ``units_ahead`` units being paid for in advance (prepay). ``record``: the channel's row
        as the caller read it, from which it chose ``amount`` (else it is read here); the store
        refuses an amount not above the one stored.
        """
        async with self._lock(channel_id):
            return await self._sign_locked(channel_id, amount, self.record(channel_id, record), units_ahead)

    async def _sign_locked(self, channel_id: str, amount: int, rec: PayerRecord, units_ahead: int = 0) -> Payment:
        if rec.state is ChannelState.FUNDING:
            await self.status(channel_id)  # the payee decides when it is open
            rec = self.store.get(channel_id)
        if rec.state is not ChannelState.OPEN:
            raise not_open_error(ChannelState(rec.state))
        if rec.terms is not None:
            self._agreed(rec).check_signable(
                amount,
                units_received=rec.units,
                units_ahead=units_ahead,
                payments=rec.payments,
                now=time.time(),
            )
        ch = self._current(rec)
        payment = ch.sign_payment(amount)
        # group commit: durable (with the other payments signed meanwhile) before it is sent; the same
        # commit writes the units received so far and extends the request counters if they run low
        if not await self.store.save_signed_async(
            channel_id, payment.amount_sat, payment.signature, counter_floor=self.clock_us()
        ):
            raise StalePayment("a higher payment is already stored")
        ch.commit_payment(payment)
        return payment

    def request_auth(
        self,
        channel_id: str,
        method: str,
        url: str,
        body: bytes | None = None,
        payment_headers: Mapping[str, str] | None = None,
    ) -> str:
        """The ``X-Btcchannel-Auth`` value of one metered request (auth v2, ``v2.<counter>.<signature>``):
        the channel key's signature over the channel, the next counter, ``method``, ``url``'s authority
        and raw target, the SHA-256 of ``body`` and the payment headers the request carries. The
        counter is ``max(stored + 1, microsecond clock)``, stored before it is used: it never repeats
        or goes down, across restarts and clock steps (handed out from a block reserved durably in the
        store, so most requests commit nothing for it)."""
        counter = self.store.next_request_counter(channel_id, self.clock_us())
        return self._signed_auth(channel_id, counter, method, url, body, payment_headers)

    async def request_auth_async(
        self,
        channel_id: str,
        method: str,
        url: str,
        body: bytes | None = None,
        payment_headers: Mapping[str, str] | None = None,
    ) -> str:
        """:meth:`request_auth` with the counter stored through the group commit."""
        counter = await self.store.next_request_counter_async(channel_id, self.clock_us())
        return self._signed_auth(channel_id, counter, method, url, body, payment_headers)

    @staticmethod
    def clock_us() -> int:
        """The wall clock in microseconds: the floor of each request counter (never its only source)."""
        return time.time_ns() // 1000

    def _signed_auth(
        self,
        channel_id: str,
        counter: int,
        method: str,
        url: str,
        body: bytes | None,
        payment_headers: Mapping[str, str] | None,
    ) -> str:
        u = URL(url)  # the authority and raw target exactly as aiohttp sends them (percent-encoded)
        key = self._keys.get(channel_id)
        if key is None:
            key = self.store.get(channel_id).privkey
            if key:  # (a lost key is re-derived by ``restore_keys``: not kept while empty)
                self._keys[channel_id] = key
        return auth_header_v2(
            key, channel_id, counter, method, u.host_port_subcomponent or "", u.raw_path_qs, body, payment_headers
        )

    def resync_request_counter(self, channel_id: str, last_counter: int) -> None:
        """The payee answered 401 naming ``last_counter`` as the last one it accepted (this store lost
        a counter, e.g. restored from an older backup): the next counter is above it."""
        self.store.raise_request_counter(channel_id, last_counter)

    async def _send(self, rec: PayerRecord, payment: Payment) -> int:
        _, ans = await self.request("POST", self._url(rec, "/payments"), payment.to_json())
        if not isinstance(ans, dict) or ans.get("amount_sat") != payment.amount_sat:
            raise ProtocolViolation(f"payment of {payment.amount_sat} answered with {ans!r}")
        await self.store.set_acked_async(rec.channel_id, payment.amount_sat)
        if ans.get("state") in (ChannelState.CLOSING, ChannelState.CLOSED):
            state = state_after_report(self.store.get(rec.channel_id).state, ans["state"], rec.channel_id)
            if state is not None:
                self.store.set_state(rec.channel_id, state)
        return payment.amount_sat

    async def pay(self, channel_id: str, increment: int | None = None, *, amount: int | None = None) -> int:
        """Pay ``increment`` more, or up to the cumulative ``amount``; returns the acknowledged total.

        An unacknowledged stored payment is re-sent first (``resume``).
        """
        if (increment is None) == (amount is None):
            raise BadRequest("give exactly one of increment and amount")
        self.record(channel_id)  # refused when the channel belongs to another network
        async with self._lock(channel_id):
            rec = self.store.get(channel_id)
            if rec.amount_sat > rec.acked_sat:
                await self.resume(channel_id)
                rec = self.store.get(channel_id)
            target = rec.amount_sat + increment if increment is not None else amount
            assert target is not None
            if increment is not None and rec.state in (ChannelState.OPEN, ChannelState.FUNDING):
                self._refuse_metered(rec, target)  # an ended channel says so instead (not_open_error)
            payment = await self._sign_locked(channel_id, target, rec)
        return await self._send(rec, payment)

    def _refuse_metered(self, rec: PayerRecord, target: int) -> None:
        """``MeteredChannel`` when ``rec`` is metered (a price per unit was agreed) and ``target`` is
        more than the units received pay for: such a channel pays as units are bought, not at will."""
        if rec.terms is None:
            return
        terms = self._agreed(rec)
        cap = terms.max_signable(rec.units)
        if terms.price_sat > 0 and cap is not None and target > cap:
            raise MeteredChannel(
                f"channel {rec.channel_id} is metered ({terms.price_sat} sat a unit, {terms.mode}): it pays only "
                f"for units received ({rec.units} so far, {cap} sat), so {target - rec.amount_sat} sat more "
                "cannot be paid on its own"
            )

    async def refresh(self, payee_timeout: float = 5.0) -> int:
        """Bring every channel up to the chain's and the payee's view; the tip height.

        The chain first (:func:`~btcchannel.payer.views.refresh_from_chain`), then the payee, for
        each channel whose funding is confirmed but that it has not yet reported open, each open
        one whose funding is no longer in a block (a reorg: the payee reports it ``funding`` again),
        and each closing one (the payee says when its close is final); a payee that does not answer
        within ``payee_timeout`` seconds leaves the stored state as it is.
        """
        tip = await refresh_from_chain(self.store, self.node)
        for rec in self.store.list():
            if (
                rec.state not in (ChannelState.FUNDING, ChannelState.OPEN, ChannelState.CLOSING)
                or rec.funding_txid is None
            ):
                continue
            if rec.state is not ChannelState.CLOSING and bool(await self.node.tx_confirmations(rec.funding_txid)) is (
                rec.state is ChannelState.OPEN
            ):
                continue  # funding with no block yet, or open with its funding in one: nothing to ask
            try:
                await asyncio.wait_for(self.status(rec.channel_id), payee_timeout)
            except (ChannelError, asyncio.TimeoutError):
                continue  # the payee is away: the stored view stands, the chain decides the rest
        return tip

    async def resume(self, channel_id: str) -> dict[str, Any]:
        """Reconcile with the payee after a restart: re-send the stored payment if it was not acknowledged."""
        rec = self.store.get(channel_id)
        if rec.state is ChannelState.FUNDING and rec.funding_txid is not None:
            obj = await self.status(channel_id)
            if obj["state"] == ChannelState.PROPOSED:
                await self._register_funding(channel_id)
        obj = await self.status(channel_id)
        rec = self.store.get(channel_id)
        if obj["state"] == ChannelState.OPEN and rec.signature is not None and obj["amount_sat"] < rec.amount_sat:
            await self._send(rec, Payment(rec.amount_sat, rec.signature))
            obj = await self.status(channel_id)
        return obj

    async def refund(
        self, channel_id: str, *, fee_rate_sat_vb: float | None = None, dest_address: str | None = None
    ) -> str:
        """Take the whole deposit back through the timelocked path once the chain reaches the expiry;
        the refund txid (:meth:`refund_details` says more)."""
        res = await self.refund_details(channel_id, fee_rate_sat_vb=fee_rate_sat_vb, dest_address=dest_address)
        return str(res["refund_txid"])

    async def refund_details(
        self, channel_id: str, *, fee_rate_sat_vb: float | None = None, dest_address: str | None = None
    ) -> dict[str, Any]:
        """Refund (:meth:`btcchannel.payer.refund.Refunds.refund_details`; the fee rate defaults to the
        client's ``fee_rate_sat_vb``, then the node's estimate): ``refund_txid``, ``amount_sat``,
        ``fee_sat``, ``fee_rate_sat_vb``."""
        return await self.refunds.refund_details(
            channel_id, fee_rate_sat_vb=fee_rate_sat_vb or self.fee_rate_sat_vb, dest_address=dest_address
        )

    async def close(self, channel_id: str) -> dict[str, Any]:
        """Ask the payee to close with the last payment (signed close request). A stateless proposal
        without a funding is cancelled here alone (the payee holds nothing of it): ``failed``,
        ``cancelled_by_payer``."""
        rec = self.record(channel_id)
        if rec.proposal_token is not None and rec.funding_txid is None:
            return self._unfunded_proposal(rec, "cancelled_by_payer")
        ch = self._channel(rec)
        sig = ch.close_request_signature(channel_id)
        _, obj = await self.request("POST", self._url(rec, "/close"), {"signature": sig.hex()})
        self._note_remote(rec, obj)
        return dict(obj)

    def channel_for(self, url: str) -> str:
        """The newest open (else funding) channel of this payer to the payee serving ``url``,
        as the local store knows it (``NotOpen`` if none); :meth:`pick_channel` asks the payee."""
        recs = to_payee(self.list(), url)
        for wanted in (ChannelState.OPEN, ChannelState.FUNDING):
            for rec in recs:
                if rec.state is wanted:
                    return rec.channel_id
        raise none_usable(url, recs)

    async def pick_channel(self, url: str, min_remaining_sat: int = 1) -> str:
        """The channel to pay ``url``'s payee with: the newest one the payee reports ``open`` with
        at least ``min_remaining_sat`` of its deposit left, else the newest one still funding
        (the caller waits for it); ``NotOpen`` saying why when none is usable (``BadUrl`` for a URL
        without http(s)://)."""
        check_payee_url(url)
        recs = [r for r in to_payee(self.list(), url) if r.state in (ChannelState.OPEN, ChannelState.FUNDING)]
        funding: str | None = None
        for rec in recs:
            await self.status(rec.channel_id)
            fresh = self.store.get(rec.channel_id)
            if fresh.state is ChannelState.OPEN and fresh.deposit_sat - fresh.amount_sat >= min_remaining_sat:
                return fresh.channel_id
            if fresh.state is ChannelState.FUNDING and funding is None:
                funding = fresh.channel_id
        if funding is not None:
            return funding
        raise none_usable(url, to_payee(self.list(), url))

    def list(self) -> list[PayerRecord]:
        """Every channel in the payer's store."""
        return self.store.list()

    def export_backup(self) -> dict[str, Any]:
        """All channels with their keys (keep it secret)."""
        return self.store.export_backup()

    def import_backup(self, data: dict[str, Any]) -> int:
        """Merge a backup (keeps the higher signed amount per channel)."""
        return self.store.import_backup(data)
