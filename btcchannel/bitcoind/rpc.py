"""The Bitcoin node, as the rest of btcchannel sees it (asynchronous).

:class:`Node` wraps bitcoind's JSON-RPC interface through the ``bitcoinrpc``
package and exposes only what payment channels need: the chain tip, unspent
outputs and confirmations, ``testmempoolaccept`` and broadcast, fee estimates,
finding the transaction that spends an outpoint, and funding an output from the
node's wallet.

This module is the RPC edge of the library:

- amounts are integer satoshis on the Python side; bitcoind's BTC floats are
  converted exactly on the way in and amounts are sent as decimal strings on
  the way out (never floats);
- failures are typed: an unreachable, timed-out, warming-up or
  credential-refusing node raises :class:`~btcchannel.errors.NodeUnavailable`,
  an RPC error raises the class registered for its code in
  :mod:`btcchannel.bitcoind.errors` (e.g.
  :class:`~btcchannel.bitcoind.errors.RpcInvalidAddressOrKey`; a plain
  :class:`~btcchannel.errors.NodeError` for other codes), with the node's code
  in ``rpc_code``;
- authentication is either ``rpcuser``/``rpcpassword`` (``auth=``) or the
  node's cookie file (``cookie_file=``, normally ``<datadir>/<network>/.cookie``),
  which is read lazily and read again when the node refuses it (bitcoind writes
  a new cookie every time it starts);
- wallet calls go to ``<url>/wallet/<name>``; every endpoint shares one HTTP
  connection pool;
- nothing needs the node's ``-txindex``: a confirmed transaction is read from the block it was
  seen in (noted by a block follower, found by a bounded scan, or named by the depth ``gettxout``
  gave for one of its outputs), so a pruned node without an index will do.

Example::

    async with Node("http://127.0.0.1:18443", cookie_file=datadir / "regtest/.cookie",
                    wallet="payer") as node:
        outpoint = await node.fund_output(funding_script, 100_000)
        print(await node.tx_confirmations(outpoint.txid))
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import orjson
from bitcoinrpc import BitcoinRPC, RPCError

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.bitcoind.errors import (
    RpcInvalidAddressOrKey,
    RpcInvalidParameter,
    RpcInWarmup,
    RpcMiscError,
    RpcVerifyRejected,
    RpcWalletNotFound,
    from_rpc,
)
from btcchannel.core.tx import OutPoint
from btcchannel.errors import NodeError, NodePruned, NodeUnavailable

__all__ = ["Node", "TxOutInfo"]

_HEADERS = {"content-type": "application/json"}
_BTC_PER_KVB_IN_SAT_PER_VB = 100_000_000 / 1000  # a fee rate in BTC/kvB times this is sat/vB


@dataclass(frozen=True)
class TxOutInfo:
    """An unspent transaction output as the node reports it.

    ``confirmations`` is 0 for an output created by a transaction still in the
    mempool; ``coinbase`` says whether a coinbase transaction created it.
    """

    value_sat: int
    script: bytes
    confirmations: int
    coinbase: bool = False


def _sats(value: Any, what: str) -> int:
    """A BTC amount from a node reply in satoshis (NodeError if it is not one)."""
    try:
        return btc_to_sat(value)
    except (ValueError, ArithmeticError) as e:
        raise NodeError(f"the node returned an invalid amount for {what}: {value!r}") from e


def _http_error(method: str, status: int) -> NodeError | NodeUnavailable:
    """The error for an HTTP error status of the node's RPC server (not an RPC error reply)."""
    if status in (401, 403):
        return NodeUnavailable(f"{method}: the node refused the RPC credentials (HTTP {status})")
    if status == 503:
        return NodeUnavailable(f"{method}: the node is busy (HTTP 503)")
    return NodeError(f"{method}: HTTP {status} from the node")


_K = TypeVar("_K")
_V = TypeVar("_V")
_REMEMBERED = 10_000  # entries of each of the node client's memories of the chain


def _bounded(memory: dict[_K, _V]) -> dict[_K, _V]:
    """``memory``, emptied first when it is full (a forgotten entry costs a lookup again)."""
    if len(memory) >= _REMEMBERED:
        memory.clear()
    return memory


class Node:
    """An asynchronous client of one bitcoind (Bitcoin Core >= 25 or Bitcoin Knots).

    :param url: the RPC URL, e.g. ``"http://127.0.0.1:8332"`` (no wallet path).
    :param auth: ``(rpcuser, rpcpassword)``; mutually exclusive with ``cookie_file``.
    :param cookie_file: the node's ``.cookie`` file (``<datadir>/<network>/.cookie``).
    :param wallet: the wallet used by the wallet methods (:meth:`new_address`,
        :meth:`fund_output`); ``None`` uses the node's default wallet (works when
        exactly one wallet is loaded).
    :param timeout: seconds for any single RPC (connect, write, read).

    Use it as an async context manager or call :meth:`aclose` when done.
    """

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        cookie_file: Path | None = None,
        wallet: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        if auth is not None and cookie_file is not None:
            raise ValueError("give either auth or cookie_file, not both")
        self.url = url.rstrip("/")
        self.wallet = wallet
        self.timeout = timeout
        self._cookie_file = Path(cookie_file) if cookie_file is not None else None
        self._cookie: tuple[str, str] | None = None
        self._cookie_lock = asyncio.Lock()
        self._client = httpx.AsyncClient(auth=auth, headers=_HEADERS, timeout=httpx.Timeout(timeout))
        self._rpcs: dict[str | None, BitcoinRPC] = {}
        self._confirmed_spends: dict[OutPoint, tuple[str, int]] = {}  # outpoint -> (txid, height)
        # where transactions were seen, so that no lookup needs the node's -txindex:
        self._seen_in: dict[str, str] = {}  # txid -> hash of a block holding it
        self._depth_hints: dict[str, tuple[str, int]] = {}  # txid -> (best block, confirmations) of gettxout
        self._searched: dict[str, tuple[int, str]] = {}  # txid -> (height, hash) of the tip searched up to
        self._txindex: bool | None = None  # whether the node keeps -txindex (asked once)
        #: every block above this height was read by a block follower noting the transactions it
        #: watches (:meth:`note_block`): a search for one of them need not read those blocks again
        self.followed_after: int | None = None

    # ------------------------------------------------------------------ plumbing

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool (idempotent)."""
        await self._client.aclose()

    def _endpoint(self, wallet: str | None) -> BitcoinRPC:
        rpc = self._rpcs.get(wallet)
        if rpc is None:
            url = self.url if wallet is None else f"{self.url}/wallet/{quote(wallet, safe='')}"
            rpc = BitcoinRPC(url, client=self._client)
            self._rpcs[wallet] = rpc
        return rpc

    def _read_cookie(self) -> tuple[str, str]:
        assert self._cookie_file is not None
        try:
            text = self._cookie_file.read_text().strip()
        except OSError as e:
            raise NodeUnavailable(
                f"cannot read the node's cookie file {self._cookie_file} (is bitcoind running?): {e}"
            ) from e
        user, sep, password = text.partition(":")
        if not sep:
            raise NodeUnavailable(f"malformed cookie file {self._cookie_file}")
        return user, password

    async def _load_cookie(self, refresh: bool) -> bool:
        """Install the cookie as the client's auth; with ``refresh``, True if it changed."""
        async with self._cookie_lock:
            if self._cookie is not None and not refresh:
                return False
            cookie = self._read_cookie()
            changed = cookie != self._cookie
            self._cookie = cookie
            self._client.auth = httpx.BasicAuth(*cookie)
            return changed

    async def _acall_once(self, method: str, params: list[Any], wallet: str | None) -> Any:
        try:
            return await self._endpoint(wallet).acall(method, params)
        except RPCError as e:
            message = str(e.error.get("message", ""))
            error = from_rpc(int(e.error.get("code", 0)), f"{method}: {message}")
            if isinstance(error, RpcInWarmup):
                raise NodeUnavailable(f"{method}: the node is starting: {message}") from e
            raise error from e
        except httpx.HTTPStatusError:
            raise  # handled by call(), which may refresh the cookie
        except httpx.TimeoutException as e:
            raise NodeUnavailable(f"{method}: no answer from {self.url} in {self.timeout:g}s") from e
        except httpx.HTTPError as e:  # transport errors: refused, reset, DNS, protocol
            raise NodeUnavailable(f"{method}: cannot reach {self.url}: {type(e).__name__}: {e}") from e
        except orjson.JSONDecodeError as e:
            raise NodeError(f"{method}: malformed reply from the node: {e}") from e

    async def call(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        """One RPC call; returns the ``result`` of the reply.

        ``wallet`` routes the call to ``/wallet/<wallet>`` (``None``: the node
        endpoint, which also serves the default wallet). Parameters go out as
        JSON: pass amounts as BTC strings (see :func:`btcchannel.amounts.sat_to_btc`).

        Raises the :class:`NodeError` subclass for the code (with ``rpc_code``; see
        :func:`~btcchannel.bitcoind.errors.from_rpc`) when the node answers with an error,
        :class:`NodeUnavailable` when it cannot be reached, times out, is still starting, or
        refuses the credentials.
        """
        plist = list(params)
        if self._cookie_file is not None:
            await self._load_cookie(refresh=False)
        sent_with = self._cookie
        try:
            return await self._acall_once(method, plist, wallet)
        except httpx.HTTPStatusError as e:
            refused = e
        if refused.response.status_code == 401 and await self._cookie_renewed(sent_with):
            try:  # once, with the new cookie
                return await self._acall_once(method, plist, wallet)
            except httpx.HTTPStatusError as e:
                refused = e
        raise _http_error(method, refused.response.status_code) from refused

    async def _cookie_renewed(self, sent_with: tuple[str, str] | None) -> bool:
        """After a 401: whether the cookie file now holds another cookie than the one the call was
        sent with (bitcoind writes a fresh cookie each time it starts; a concurrent call may have
        read it first)."""
        if self._cookie_file is None:
            return False
        return await self._load_cookie(refresh=True) or self._cookie != sent_with

    # ------------------------------------------------------------------ chain

    async def tip_height(self) -> int:
        """The height of the node's best block."""
        return int(await self.call("getblockcount"))

    async def get_txout(self, outpoint: OutPoint, include_mempool: bool = True) -> TxOutInfo | None:
        """The unspent output at ``outpoint``, or ``None`` if it is spent or unknown.

        With ``include_mempool`` (the default) an output spent in the mempool is
        ``None`` and one created in the mempool is returned with 0 confirmations.
        """
        res = await self.call("gettxout", outpoint.txid, outpoint.vout, include_mempool)
        if res is None:
            return None
        confirmations = int(res.get("confirmations", 0))
        if confirmations > 0 and res.get("bestblock"):  # where its transaction is, should it be looked up
            _bounded(self._depth_hints)[outpoint.txid] = (str(res["bestblock"]), confirmations)
        return TxOutInfo(
            value_sat=_sats(res["value"], "gettxout value"),
            script=bytes.fromhex(res["scriptPubKey"]["hex"]),
            confirmations=confirmations,
            coinbase=bool(res.get("coinbase", False)),
        )

    # ------------------------------------------------------------------ transactions by txid
    #
    # Without ``-txindex`` the node finds a confirmed transaction only in a block it is told about
    # (``getrawtransaction txid true blockhash``). The node remembers the blocks it saw each
    # transaction in: blocks its callers followed (:meth:`note_block`, :meth:`note_spend`), blocks
    # it scanned itself, and the depth ``gettxout`` reported for an unspent output.

    def note_block(self, txid: str, block_hash: str) -> None:
        """Remember that ``txid`` is in block ``block_hash`` (a block follower saw it there)."""
        _bounded(self._seen_in)[txid] = block_hash

    def note_spend(self, outpoint: OutPoint, txid: str, height: int, block_hash: str) -> None:
        """Remember that ``txid``, in block ``block_hash`` at ``height``, spends ``outpoint``
        (:meth:`find_spender` then needs no block scan; a reorganisation is still noticed)."""
        _bounded(self._confirmed_spends)[outpoint] = (txid, height)
        self.note_block(txid, block_hash)

    async def _block_of(self, txid: str) -> str | None:
        """The hash of a block ``txid`` was seen in, if this client knows one."""
        known = self._seen_in.get(txid)
        if known is not None:
            return known
        hint = self._depth_hints.pop(txid, None)
        if hint is None:
            return None
        best, depth = hint
        try:
            header = await self.call("getblockheader", best)
            if int(header.get("confirmations", -1)) < 0:
                return None  # that tip left the active chain: the depth says nothing any more
            block_hash = str(await self.call("getblockhash", int(header["height"]) - depth + 1))
        except (RpcInvalidAddressOrKey, RpcInvalidParameter):
            return None
        self.note_block(txid, block_hash)
        return block_hash

    async def get_transaction(self, txid: str, blockhash: str | None = None) -> dict[str, Any] | None:
        """``getrawtransaction txid true [blockhash]`` (a dict), or ``None`` if the node cannot find it.

        Needs no ``-txindex``: a mempool transaction is found as it is, a confirmed one in the block
        given, or the block this client saw it in (:meth:`note_block`, a block scan, the depth of
        an unspent output of it that :meth:`get_txout` returned); with ``-txindex`` any confirmed
        one. A transaction in a block that left the active chain has ``"confirmations": 0`` and
        ``"in_active_chain": false``. Amounts in the dict are bitcoind's BTC floats, untouched.
        """
        block = blockhash if blockhash is not None else await self._block_of(txid)
        if block is not None:
            try:
                res = await self.call("getrawtransaction", txid, True, block)
            except (RpcInvalidAddressOrKey, RpcMiscError):  # not in that block, or the block is pruned
                if self._seen_in.get(txid) == block:
                    del self._seen_in[txid]
            else:
                self.note_block(txid, block)
                return dict(res)
        try:
            res = await self.call("getrawtransaction", txid, True)
        except RpcInvalidAddressOrKey:
            return None
        if res.get("blockhash"):
            self.note_block(txid, str(res["blockhash"]))
        return dict(res)

    async def tx_confirmations(self, txid: str, search_from: int | None = None) -> int | None:
        """Confirmations of ``txid``: ``None`` if unknown to the node, 0 if in the mempool.

        Asked in turn until one answers: the header of a block the transaction was seen in (see
        :meth:`get_transaction`; headers are kept when blocks are pruned, so a pruned block still
        counts), the transaction as :meth:`get_transaction` finds it, the wallet (its own
        transactions), and with ``search_from`` the blocks from the tip down to that height (newest
        first; :class:`~btcchannel.errors.NodePruned` if the node pruned one of them).
        """
        conf = await self._confirmations_of_seen_block(txid)
        if conf is None:
            conf = await self._confirmations_as_found(txid)
        if conf is None and self.wallet is not None:
            conf = await self._confirmations_in_wallet(txid)
        if conf is None and search_from is not None and not await self.has_txindex():  # (a txindex would have found it)
            conf = await self._search_blocks(txid, search_from)
        return conf

    async def _confirmations_of_seen_block(self, txid: str) -> int | None:
        """The confirmations of the block ``txid`` was seen in, read from its header; None when no
        block is known, or that block left the active chain (then it is forgotten)."""
        block = await self._block_of(txid)
        if block is None:
            return None
        conf = await self._block_confirmations(block)
        if conf > 0:
            return conf
        self._seen_in.pop(txid, None)  # that block left the active chain
        return None

    async def _block_confirmations(self, block_hash: str) -> int:
        """The confirmations of block ``block_hash`` from its header (kept when the block is pruned):
        -1 for a block off the active chain, or one the node does not know."""
        try:
            header = await self.call("getblockheader", block_hash)
        except RpcInvalidAddressOrKey:
            return -1
        return int(header.get("confirmations", -1))

    async def _confirmations_as_found(self, txid: str) -> int | None:
        """The confirmations :meth:`get_transaction` reports (0 in the mempool); None when it does not
        find ``txid``, or finds it only in a block no longer in the active chain and not back in the
        mempool."""
        tx = await self.get_transaction(txid)
        if tx is None:
            return None
        conf = int(tx.get("confirmations", 0))
        if conf > 0 or "blockhash" not in tx:
            return conf
        self._seen_in.pop(txid, None)  # in a block that left the active chain
        return 0 if await self._in_mempool(txid) else None

    async def _confirmations_in_wallet(self, txid: str) -> int | None:
        """The confirmations the wallet knows of its own transaction ``txid`` (its block noted); 0 for
        one replaced or conflicted that is (back) in the mempool; None when the wallet does not say."""
        try:
            wtx = await self.call("gettransaction", txid, wallet=self.wallet)
        except (RpcInvalidAddressOrKey, RpcWalletNotFound):
            return None
        conf = int(wtx.get("confirmations", 0))
        if conf > 0:
            if wtx.get("blockhash"):
                self.note_block(txid, str(wtx["blockhash"]))
            return conf
        if conf == 0 and await self._in_mempool(txid):
            return 0
        return None

    async def has_txindex(self) -> bool:
        """Whether the node keeps a transaction index (``getindexinfo``; asked once)."""
        if self._txindex is None:
            self._txindex = "txindex" in await self.call("getindexinfo")
        return self._txindex

    async def _search_blocks(self, txid: str, start: int) -> int | None:
        """Confirmations of ``txid`` found by reading the blocks from the tip down to ``start``
        (neither blocks searched before, still in the active chain, nor blocks a follower read
        since :attr:`followed_after` are read again)."""
        searched = self._searched.get(txid)
        if searched is not None:
            searched_height, searched_hash = searched  # the top block of the last search
            if await self._block_confirmations(searched_hash) > 0:  # still in the active chain
                start = max(start, searched_height + 1)
        tip = await self.tip_height()
        top = tip if self.followed_after is None else min(tip, self.followed_after)
        if top < max(start, 0):
            return None
        top_hash = ""
        for height in range(top, max(start, 0) - 1, -1):
            block_hash, block = await self._read_block(height, 1)
            if block is None:
                return None  # reorganised meanwhile: not found this time
            top_hash = top_hash or block_hash
            if txid in block["tx"]:
                self.note_block(txid, block_hash)
                return tip - height + 1
        _bounded(self._searched)[txid] = (top, top_hash)
        return None

    async def _read_block(self, height: int, verbosity: int) -> tuple[str, dict[str, Any] | None]:
        """(hash, ``getblock`` at ``verbosity``) of the active chain's block at ``height``; None for a
        block that left the chain meanwhile; :class:`NodePruned` for a pruned one."""
        try:
            block_hash = str(await self.call("getblockhash", height))
            return block_hash, dict(await self.call("getblock", block_hash, verbosity))
        except (RpcInvalidAddressOrKey, RpcInvalidParameter):
            return "", None
        except RpcMiscError as err:
            if "pruned" in str(err).lower() or "not available" in str(err).lower():
                raise NodePruned(f"the node pruned block {height}, which the payee has to read: {err}") from err
            raise

    async def _in_mempool(self, txid: str) -> bool:
        try:
            await self.call("getmempoolentry", txid)
        except RpcInvalidAddressOrKey:
            return False
        return True

    async def _mined_by_wallet(self, txid: str) -> bool:
        """Whether the wallet's transaction ``txid`` is in a block."""
        try:
            tx = await self.call("gettransaction", txid, wallet=self.wallet)
        except RpcInvalidAddressOrKey:
            return False
        return int(tx.get("confirmations", 0)) > 0

    async def test_mempool_accept(self, tx_hex: str) -> tuple[bool, str | None]:
        """Would the node's mempool accept this transaction now?

        Returns ``(True, None)`` or ``(False, reject_reason)`` where the reason is
        bitcoind's ``reject-reason`` (e.g. ``"non-final"``,
        ``"missing-inputs"``, ``"txn-mempool-conflict"``), followed by
        ``": <reject-details>"`` when the node gives details.
        """
        res = await self.call("testmempoolaccept", [tx_hex])
        entry = res[0]
        if entry.get("allowed"):
            return True, None
        reason = str(entry.get("reject-reason") or entry.get("package-error") or "rejected")
        details = entry.get("reject-details")
        if details and details != reason:
            reason = f"{reason}: {details}"
        return False, reason

    async def broadcast(self, tx_hex: str) -> str:
        """Send a signed transaction to the network; returns its txid.

        Broadcasting a transaction already in the mempool returns its txid again;
        one already confirmed raises :class:`~btcchannel.bitcoind.errors.RpcAlreadyInChain`;
        a rejected one :class:`~btcchannel.bitcoind.errors.RpcVerifyRejected` or
        :class:`~btcchannel.bitcoind.errors.RpcVerifyError` (missing or spent inputs), one
        that does not decode :class:`~btcchannel.bitcoind.errors.RpcDeserializationError`.
        """
        return str(await self.call("sendrawtransaction", tx_hex))

    async def estimate_fee_rate(self, conf_target: int = 6, fallback_sat_vb: float = 2.0) -> float:
        """A fee rate in sat/vB for confirmation within ``conf_target`` blocks.

        Uses ``estimatesmartfee``; when the node has no estimate (always the case
        on regtest, and on a node that has just started) ``fallback_sat_vb`` is
        used. The result is never below the node's current mempool minimum fee.
        """
        rate = fallback_sat_vb
        res = await self.call("estimatesmartfee", conf_target)
        if isinstance(res, dict) and res.get("feerate") is not None:
            rate = float(res["feerate"]) * _BTC_PER_KVB_IN_SAT_PER_VB
        info = await self.call("getmempoolinfo")
        floor = max(float(info.get("mempoolminfee", 0)), float(info.get("minrelaytxfee", 0)))
        return max(rate, floor * _BTC_PER_KVB_IN_SAT_PER_VB)

    # ------------------------------------------------------------------ wallet

    async def new_address(self) -> str:
        """A fresh bech32 (P2WPKH) receiving address of the wallet."""
        return str(await self.call("getnewaddress", "", "bech32", wallet=self.wallet))

    async def _script_address(self, script: bytes) -> str:
        res = await self.call("decodescript", script.hex())
        address = res.get("address") if isinstance(res, dict) else None
        if not address:
            raise RpcMiscError(f"script {script.hex()} has no address form")
        return str(address)

    async def fund_output(self, script: bytes, amount_sat: int, *, fee_rate_sat_vb: float | None = None) -> OutPoint:
        """Pay exactly ``amount_sat`` to ``script`` from the wallet, broadcast, return the outpoint.

        The transaction is built with ``createrawtransaction`` (the funded output
        first, locktime 0), funded by the wallet with bech32 change placed
        after it, signed, checked with ``testmempoolaccept``, broadcast, and
        checked to be in the mempool. ``fee_rate_sat_vb`` overrides the wallet's
        own fee choice. Raises :class:`NodeError` if any step fails (an
        underfunded wallet: :class:`~btcchannel.bitcoind.errors.RpcWalletError`, "Insufficient
        funds"); the wallet's coins are not left locked.
        """
        if isinstance(amount_sat, bool) or not isinstance(amount_sat, int) or amount_sat <= 0:
            raise ValueError("amount_sat must be a positive integer")
        address = await self._script_address(script)
        raw = await self.call("createrawtransaction", [], [{address: sat_to_btc(amount_sat)}], 0, True)
        options: dict[str, Any] = {"change_type": "bech32", "changePosition": 1, "lockUnspents": True}
        if fee_rate_sat_vb is not None:
            options["fee_rate"] = f"{fee_rate_sat_vb:.3f}"
        funded = await self.call("fundrawtransaction", raw, options, wallet=self.wallet)
        unfunded_inputs: list[dict[str, Any]] = []
        try:
            decoded = await self.call("decoderawtransaction", funded["hex"])
            unfunded_inputs = [{"txid": i["txid"], "vout": i["vout"]} for i in decoded["vin"]]
            out0 = decoded["vout"][0]
            if (
                bytes.fromhex(out0["scriptPubKey"]["hex"]) != script
                or _sats(out0["value"], "funded output") != amount_sat
                or int(funded.get("changepos", -1)) == 0
            ):
                raise RpcMiscError("the wallet did not keep the funded output first")
            signed = await self.call("signrawtransactionwithwallet", funded["hex"], wallet=self.wallet)
            if not signed.get("complete"):
                raise RpcMiscError(f"the wallet could not sign the funding transaction: {signed.get('errors')}")
            ok, reason = await self.test_mempool_accept(signed["hex"])
            if not ok:
                raise RpcVerifyRejected(f"the funding transaction would be rejected: {reason}")
            txid = await self.broadcast(signed["hex"])
            # (a block may take it between the broadcast and this check)
            if not await self._in_mempool(txid) and not await self._mined_by_wallet(txid):
                raise RpcVerifyRejected(f"funding transaction {txid} was sent but is not in the mempool")
            unfunded_inputs = []
        finally:
            if unfunded_inputs:
                try:
                    await self.call("lockunspent", True, unfunded_inputs, wallet=self.wallet)
                except (NodeError, NodeUnavailable):
                    pass  # the original error matters more; a restart unlocks anyway
        return OutPoint(txid, 0)

    # ------------------------------------------------------------------ spends

    async def find_spender(self, outpoint: OutPoint, from_height: int) -> str | None:
        """The txid of the transaction spending ``outpoint``, in a block or in the mempool.

        Confirmed spends are searched in the blocks from ``from_height`` (for
        example the height at which the channel was created) up to the tip,
        newest first, and remembered (a remembered spend is checked to be still
        confirmed before it is returned, so a reorganisation is noticed); mempool
        spends are found through ``gettxspendingprevout``. ``None`` if nothing
        spends it.
        """
        known = self._confirmed_spends.get(outpoint)
        if known is not None and known[1] >= from_height:
            spender = await self.confirmed_spender(outpoint)
            if spender is not None:
                return spender
        scanned_to = from_height - 1  # blocks up to here are known not to spend it
        while True:
            tip = await self.tip_height()
            if await self.get_txout(outpoint, include_mempool=False) is not None:
                scanned_to = max(scanned_to, tip)  # unspent in the chain as of (at least) tip
            elif tip > scanned_to:
                found, complete = await self._scan_blocks(outpoint, scanned_to + 1, tip)
                if found is not None:
                    _bounded(self._confirmed_spends)[outpoint] = found  # a forgotten spend costs a scan again
                    return found[0]
                if complete:
                    scanned_to = tip
            spender = await self._mempool_spender(outpoint)
            if spender is not None:
                return spender
            # a block found meanwhile may have moved the spend out of the mempool: look again
            if scanned_to >= tip and await self.tip_height() == tip:
                return None

    async def confirmed_spender(self, outpoint: OutPoint) -> str | None:
        """The confirmed spend of ``outpoint`` this client knows of (:meth:`note_spend`, an earlier
        :meth:`find_spender`), if it is still in the active chain; reads no block."""
        known = self._confirmed_spends.get(outpoint)
        if known is None:
            return None
        txid = known[0]
        confirmations = await self.tx_confirmations(txid)
        if confirmations is not None and confirmations > 0:
            return txid
        del self._confirmed_spends[outpoint]  # a reorganisation took it out of the chain
        return None

    async def _mempool_spender(self, outpoint: OutPoint) -> str | None:
        res = await self.call("gettxspendingprevout", [{"txid": outpoint.txid, "vout": outpoint.vout}])
        spender = res[0].get("spendingtxid") if res else None
        return str(spender) if spender else None

    async def _scan_blocks(self, outpoint: OutPoint, start: int, end: int) -> tuple[tuple[str, int] | None, bool]:
        """((spending txid, height) or None, whether every block end..start was scanned)."""
        for height in range(end, max(start, 0) - 1, -1):
            block_hash, block = await self._read_block(height, 2)
            if block is None:
                return None, False  # the chain was reorganised meanwhile: the caller retries
            for tx in block["tx"]:
                for txin in tx["vin"]:
                    if txin.get("txid") == outpoint.txid and txin.get("vout") == outpoint.vout:
                        self.note_block(str(tx["txid"]), block_hash)
                        return (str(tx["txid"]), height), True
        return None, True
