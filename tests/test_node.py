"""btcchannel.bitcoind.rpc.Node against a real regtest bitcoind (no mocks)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.bitcoind.errors import (
    RpcAlreadyInChain,
    RpcDeserializationError,
    RpcInsufficientFunds,
    RpcInvalidAddressOrKey,
    RpcInvalidParameter,
    RpcMethodNotFound,
    RpcMiscError,
    RpcTypeError,
    RpcVerifyError,
    RpcVerifyRejected,
    RpcWalletAlreadyLoaded,
    RpcWalletError,
    RpcWalletNotFound,
    RpcWalletNotSpecified,
)
from btcchannel.bitcoind.regtest import RegtestNode, free_port
from btcchannel.bitcoind.rpc import Node, TxOutInfo
from btcchannel.core.tx import OutPoint
from btcchannel.errors import NodeError, NodeUnavailable


def p2wsh(witness_script: bytes) -> bytes:
    return b"\x00\x20" + hashlib.sha256(witness_script).digest()


# an arbitrary P2WSH output script (OP_TRUE would be non-standard to spend, but paying to it is fine)
SOME_P2WSH = p2wsh(b"\x51\x51\x87")


@pytest.fixture
async def node(bitcoind: RegtestNode, funded_wallet: str) -> AsyncIterator[Node]:
    async with Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet=funded_wallet) as n:
        yield n


def wallet_script(bitcoind: RegtestNode, wallet: str) -> tuple[str, bytes]:
    address = bitcoind.new_address(wallet)
    return address, bytes.fromhex(bitcoind.rpc("getaddressinfo", address, wallet=wallet)["scriptPubKey"])


def spend_hex(
    bitcoind: RegtestNode,
    wallet: str,
    outpoint: OutPoint,
    amount_sat: int,
    *,
    locktime: int = 0,
    sequence: int = 0xFFFFFFFD,
) -> str:
    """A wallet-signed transaction spending ``outpoint`` to a fresh wallet address."""
    raw = bitcoind.rpc(
        "createrawtransaction",
        [{"txid": outpoint.txid, "vout": outpoint.vout, "sequence": sequence}],
        [{bitcoind.new_address(wallet): sat_to_btc(amount_sat)}],
        locktime,
    )
    prev = bitcoind.rpc("getrawtransaction", outpoint.txid, True)["vout"][outpoint.vout]
    prevtxs = [
        {
            "txid": outpoint.txid,
            "vout": outpoint.vout,
            "amount": prev["value"],
            "scriptPubKey": prev["scriptPubKey"]["hex"],
        }
    ]  # also signs an already spent output
    signed = bitcoind.rpc("signrawtransactionwithwallet", raw, prevtxs, wallet=wallet)
    assert signed["complete"], signed
    return str(signed["hex"])


# ---------------------------------------------------------------------------- chain


async def test_tip_height_follows_the_chain(node: Node, bitcoind: RegtestNode) -> None:
    tip = await node.tip_height()
    assert tip == bitcoind.tip_height() >= 201
    bitcoind.mine(2)
    assert await node.tip_height() == tip + 2


async def test_call_routes_to_wallet_and_types_rpc_errors(node: Node, funded_wallet: str) -> None:
    info = await node.call("getwalletinfo", wallet=funded_wallet)
    assert info["walletname"] == funded_wallet
    with pytest.raises(NodeError) as e:
        await node.call("nosuchmethod")
    assert e.value.rpc_code == RpcMethodNotFound.RPC_ERROR_CODE
    assert e.value.code == "node_error"
    with pytest.raises(NodeError) as e:
        await node.call("getblockhash", 10**7)
    assert e.value.rpc_code == -8


async def test_fund_output_pays_exactly_and_confirms(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    amount = 987_654_321  # 9.87654321 BTC: every digit must survive the float round trip
    balance_before = bitcoind.balance_sat(funded_wallet)
    outpoint = await node.fund_output(SOME_P2WSH, amount)
    assert outpoint.vout == 0
    assert await node.tx_confirmations(outpoint.txid) == 0
    assert await node.get_txout(outpoint) == TxOutInfo(amount, SOME_P2WSH, 0)
    assert await node.get_txout(outpoint, include_mempool=False) is None

    tx = await node.get_transaction(outpoint.txid)
    assert tx is not None
    assert tx["locktime"] != 21
    assert btc_to_sat(tx["vout"][0]["value"]) == amount
    assert tx["vout"][0]["scriptPubKey"]["hex"] == SOME_P2WSH.hex()
    assert len(tx["vout"]) == 2
    assert tx["vout"][1]["scriptPubKey"]["type"] == "witness_v0_keyhash"  # bech32 change
    change = btc_to_sat(tx["vout"][1]["value"])
    fee = balance_before - amount - change
    assert 0 < fee < 10_000

    bitcoind.mine(1)
    assert await node.tx_confirmations(outpoint.txid) == 1
    assert await node.get_txout(outpoint) == TxOutInfo(amount, SOME_P2WSH, 1)
    assert await node.get_txout(outpoint, include_mempool=False) == TxOutInfo(amount, SOME_P2WSH, 1)
    bitcoind.mine(2)
    assert await node.tx_confirmations(outpoint.txid) == 3
    assert bitcoind.balance_sat(funded_wallet) == balance_before - amount - fee


async def test_fund_output_with_fee_rate_and_any_script(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    address, p2wpkh = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(p2wpkh, 50_000, fee_rate_sat_vb=7.0)
    tx = await node.get_transaction(outpoint.txid)
    assert tx is not None
    fee = btc_to_sat(bitcoind.rpc("getmempoolentry", outpoint.txid)["fees"]["base"])
    # the wallet sizes each input's signature at its maximum length: at most 1 vB over per input
    assert 7 * tx["vsize"] <= fee <= 7 * (tx["vsize"] + len(tx["vin"]))
    assert tx["vout"][0]["scriptPubKey"]["address"] == address


async def test_fund_output_insufficient_funds_leaves_no_coin_locked(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    with pytest.raises(NodeError) as e:
        await node.fund_output(SOME_P2WSH, 11 * 100_000_000)
    assert e.value.rpc_code == RpcWalletError.RPC_ERROR_CODE
    assert "Insufficient funds" in e.value.message
    assert bitcoind.rpc("listlockunspent", wallet=funded_wallet) == []
    # and the wallet can still spend everything it has
    await node.fund_output(SOME_P2WSH, 9 * 100_000_000)


async def test_get_txout_and_confirmations_of_unknown_things(node: Node) -> None:
    unknown = "11" * 32
    assert await node.get_txout(OutPoint(unknown, 0)) is None
    assert await node.tx_confirmations(unknown) is None
    assert await node.get_transaction(unknown) is None


async def test_new_address_is_bech32(node: Node) -> None:
    assert (await node.new_address()).startswith("bcrt1q")


async def test_estimate_fee_rate_falls_back(node: Node, bitcoind: RegtestNode) -> None:
    has_estimate = bitcoind.rpc("estimatesmartfee", 6).get("feerate") is not None
    floor = btc_to_sat(bitcoind.rpc("getmempoolinfo")["mempoolminfee"]) / 1000
    rate = await node.estimate_fee_rate(fallback_sat_vb=3.5)
    assert rate >= floor
    if not has_estimate:  # regtest normally has no estimates
        assert rate == 3.5
        assert await node.estimate_fee_rate(fallback_sat_vb=0.1) == floor


# ---------------------------------------------------------------------------- mempool policy


async def test_test_mempool_accept_reports_the_reject_reason(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 100_000)
    bitcoind.mine(1)
    tip = await node.tip_height()
    future = spend_hex(bitcoind, funded_wallet, outpoint, 90_000, locktime=tip + 5, sequence=0xFFFFFFFE)
    ok, reason = await node.test_mempool_accept(future)
    assert not ok and reason is not None and reason.startswith("non-final")

    now = spend_hex(bitcoind, funded_wallet, outpoint, 90_000)
    assert await node.test_mempool_accept(now) == (True, None)
    assert await node.get_txout(outpoint) is not None  # testmempoolaccept broadcasts nothing
    txid = await node.broadcast(now)
    assert await node.broadcast(now) == txid  # a rebroadcast of a mempool tx is fine
    ok, reason = await node.test_mempool_accept(now)
    assert not ok and reason in ("txn-already-in-mempool", "txn-already-known")


async def test_broadcast_errors_are_node_errors(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 100_000)
    bitcoind.mine(1)
    tip = await node.tip_height()
    future = spend_hex(bitcoind, funded_wallet, outpoint, 90_000, locktime=tip + 5, sequence=0xFFFFFFFE)
    with pytest.raises(NodeError) as e:
        await node.broadcast(future)
    assert e.value.rpc_code == RpcVerifyRejected.RPC_ERROR_CODE
    assert "non-final" in e.value.message

    with pytest.raises(NodeError) as e:
        await node.broadcast("00")
    assert e.value.rpc_code == -22  # RPC_DESERIALIZATION_ERROR

    spend = spend_hex(bitcoind, funded_wallet, outpoint, 90_000)
    txid = await node.broadcast(spend)
    bitcoind.mine(1)
    with pytest.raises(NodeError) as e:
        await node.broadcast(spend)
    assert e.value.rpc_code == RpcAlreadyInChain.RPC_ERROR_CODE
    # a conflicting spend of an already spent output: missing inputs
    other = spend_hex(bitcoind, funded_wallet, outpoint, 80_000)
    ok, reason = await node.test_mempool_accept(other)
    assert not ok and reason == "missing-inputs"
    with pytest.raises(NodeError) as e:
        await node.broadcast(other)
    assert e.value.rpc_code == RpcVerifyError.RPC_ERROR_CODE
    assert await node.tx_confirmations(txid) == 1


# ---------------------------------------------------------------------------- spends


async def test_find_spender_in_mempool_and_in_blocks(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 200_000)
    start = await node.tip_height()
    assert await node.find_spender(outpoint, start) is None  # funding unconfirmed, unspent
    bitcoind.mine(1)
    assert await node.find_spender(outpoint, start) is None  # confirmed, unspent

    spend = spend_hex(bitcoind, funded_wallet, outpoint, 190_000)
    txid = await node.broadcast(spend)
    assert await node.find_spender(outpoint, start) == txid  # mempool
    assert await node.get_txout(outpoint) is None
    assert await node.get_txout(outpoint, include_mempool=False) is not None

    bitcoind.mine(3)
    assert await node.find_spender(outpoint, start) == txid  # in a block
    assert await node.find_spender(outpoint, start + 2) == txid  # the spend is at start + 2
    assert await node.find_spender(outpoint, start + 3) is None  # not searched below from_height
    assert await node.find_spender(OutPoint("22" * 32, 0), start) is None


async def test_find_spender_of_an_output_spent_in_its_own_block(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 200_000)
    child = await node.broadcast(spend_hex(bitcoind, funded_wallet, outpoint, 190_000))
    start = await node.tip_height()
    assert await node.find_spender(outpoint, start) == child
    bitcoind.mine(1)
    assert await node.find_spender(outpoint, start + 1) == child


async def test_find_spender_and_confirmations_follow_a_reorg(
    node: Node, bitcoind: RegtestNode, funded_wallet: str
) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 300_000)
    bitcoind.mine(1)
    start = await node.tip_height()
    spend = await node.broadcast(spend_hex(bitcoind, funded_wallet, outpoint, 290_000))
    [block] = bitcoind.mine(1)
    assert await node.find_spender(outpoint, start) == spend
    assert await node.tx_confirmations(spend) == 1
    bitcoind.rpc("invalidateblock", block)
    try:
        # the spend is back in the mempool; the remembered confirmed spend is not trusted
        assert await node.tx_confirmations(spend) == 0
        assert await node.find_spender(outpoint, start) == spend
    finally:
        bitcoind.rpc("reconsiderblock", block)
    assert await node.tip_height() == start + 1
    assert await node.tx_confirmations(spend) == 1
    assert await node.find_spender(outpoint, start) == spend


# ---------------------------------------------------------------------------- reachability and auth


async def test_unreachable_url_is_node_unavailable() -> None:
    async with Node(f"http://127.0.0.1:{free_port()}", auth=("u", "p"), timeout=5) as n:
        with pytest.raises(NodeUnavailable) as e:
            await n.tip_height()
    assert e.value.code == "node_unavailable"


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP listener that accepts connections and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


async def test_a_node_that_never_answers_times_out_as_node_unavailable(silent_server: int) -> None:
    async with Node(f"http://127.0.0.1:{silent_server}", auth=("u", "p"), timeout=0.5) as n:
        with pytest.raises(NodeUnavailable, match="no answer"):
            await n.tip_height()


async def test_user_password_auth(bitcoind: RegtestNode) -> None:
    async with Node(bitcoind.rpc_url, auth=(bitcoind.rpc_user, bitcoind.rpc_password)) as n:
        assert await n.tip_height() == bitcoind.tip_height()


async def test_wrong_password_is_node_unavailable(bitcoind: RegtestNode) -> None:
    async with Node(bitcoind.rpc_url, auth=(bitcoind.rpc_user, "not-the-password")) as n:
        with pytest.raises(NodeUnavailable, match="refused the RPC credentials"):
            await n.tip_height()


async def test_cookie_auth(bitcoind: RegtestNode) -> None:
    assert bitcoind.cookie_file.exists()
    async with Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file) as n:
        assert await n.tip_height() == bitcoind.tip_height()


async def test_missing_cookie_file_is_node_unavailable(bitcoind: RegtestNode, tmp_path: Path) -> None:
    async with Node(bitcoind.rpc_url, cookie_file=tmp_path / ".cookie") as n:
        with pytest.raises(NodeUnavailable, match="cookie file"):
            await n.tip_height()


async def test_cookie_is_read_again_when_the_node_refuses_it(bitcoind: RegtestNode, tmp_path: Path) -> None:
    """What a bitcoind restart looks like to a long-lived client: the cookie changes."""
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:stale-from-before-the-restart")
    async with Node(bitcoind.rpc_url, cookie_file=cookie) as n:
        with pytest.raises(NodeUnavailable, match="refused the RPC credentials"):
            await n.tip_height()
        cookie.write_text(bitcoind.cookie_file.read_text())  # the node "restarted"
        assert await n.tip_height() == bitcoind.tip_height()
        assert await n.tip_height() == bitcoind.tip_height()


def test_constructor_refuses_two_kinds_of_auth(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Node("http://127.0.0.1:1", auth=("u", "p"), cookie_file=tmp_path / ".cookie")


# ---------------------------------------------------------------------------- typed RPC errors


# (expected class, method, params, wallet); "{wallet}" / "{address}" stand for the funded
# wallet's name and one of its addresses. None of these calls changes the node.
RPC_ERROR_CASES: list[tuple[type[NodeError], str, tuple[Any, ...], str | None]] = [
    (RpcMiscError, "pruneblockchain", (10,), None),  # "not in prune mode"
    (RpcTypeError, "getblockhash", ("ten",), None),
    (RpcWalletError, "createwallet", ("{wallet}",), None),  # it already exists
    (RpcInvalidAddressOrKey, "getrawtransaction", ("22" * 32,), None),
    (RpcInvalidAddressOrKey, "getmempoolentry", ("22" * 32,), None),
    (RpcInsufficientFunds, "sendtoaddress", ("{address}", "1000"), "{wallet}"),
    (RpcInvalidParameter, "getblockhash", (10**7,), None),
    (RpcWalletNotFound, "getwalletinfo", (), "no-such-wallet"),
    (RpcWalletNotSpecified, "getwalletinfo", (), None),  # several wallets are loaded
    (RpcDeserializationError, "sendrawtransaction", ("00",), None),
    (RpcDeserializationError, "decoderawtransaction", ("deadbeef",), None),
    (RpcWalletAlreadyLoaded, "loadwallet", ("{wallet}",), None),
    (RpcMethodNotFound, "nosuchmethod", (), None),
]


@pytest.mark.parametrize(
    "expected,method,params,wallet",
    RPC_ERROR_CASES,
    ids=[f"{cls.__name__}-{method}" for cls, method, _, _ in RPC_ERROR_CASES],
)
async def test_each_rpc_error_code_raises_its_class(
    node: Node,
    bitcoind: RegtestNode,
    funded_wallet: str,
    expected: type[NodeError],
    method: str,
    params: tuple[Any, ...],
    wallet: str | None,
) -> None:
    address = bitcoind.new_address(funded_wallet)

    def fill(value: Any) -> Any:
        return value.format(wallet=funded_wallet, address=address) if isinstance(value, str) else value

    args = [fill(p) for p in params]
    with pytest.raises(NodeError) as e:
        await node.call(method, *args, wallet=fill(wallet))
    assert type(e.value) is expected, (e.value.rpc_code, e.value.message)
    assert e.value.rpc_code == expected.RPC_ERROR_CODE
    assert e.value.code == "node_error"
    assert e.value.message.startswith(f"{method}: ")
    # the blocking client of RegtestNode raises the same classes
    with pytest.raises(expected):
        bitcoind.rpc(method, *args, wallet=fill(wallet))


async def test_broadcast_errors_have_their_classes(node: Node, bitcoind: RegtestNode, funded_wallet: str) -> None:
    _, script = wallet_script(bitcoind, funded_wallet)
    outpoint = await node.fund_output(script, 100_000)
    bitcoind.mine(1)
    tip = await node.tip_height()
    future = spend_hex(bitcoind, funded_wallet, outpoint, 90_000, locktime=tip + 5, sequence=0xFFFFFFFE)
    with pytest.raises(RpcVerifyRejected, match="non-final"):
        await node.broadcast(future)
    with pytest.raises(RpcDeserializationError):
        await node.broadcast("00")
    spend = spend_hex(bitcoind, funded_wallet, outpoint, 90_000)
    await node.broadcast(spend)
    bitcoind.mine(1)
    with pytest.raises(RpcAlreadyInChain):
        await node.broadcast(spend)
    with pytest.raises(RpcVerifyError):  # a conflicting spend of a spent output: missing inputs
        await node.broadcast(spend_hex(bitcoind, funded_wallet, outpoint, 80_000))


async def test_lookups_absorb_only_their_error_classes(bitcoind: RegtestNode) -> None:
    """An unknown transaction or wallet is None; any other RPC error still raises."""
    unknown = "33" * 32
    async with Node(bitcoind.rpc_url, cookie_file=bitcoind.cookie_file, wallet="no-such-wallet") as n:
        assert await n.get_transaction(unknown) is None  # RpcInvalidAddressOrKey
        assert await n.tx_confirmations(unknown) is None  # then RpcWalletNotFound
        with pytest.raises(RpcInvalidParameter):
            await n.get_transaction("33")  # not a txid at all
