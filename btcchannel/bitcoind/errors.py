"""The node's RPC errors: one class per Bitcoin Core RPC error code that callers test for.

As python-bitcoinlib's ``rpc.py`` does for its ``JSONRPCError`` subclasses, each class names its
code in ``RPC_ERROR_CODE`` (the numbers of bitcoind's ``src/rpc/protocol.h``) and is registered
under it in :data:`RPC_ERRORS`; :func:`from_rpc` turns an RPC error reply into the class for its
code, or a plain :class:`~btcchannel.errors.NodeError` for a code without one. Callers write
``except RpcInvalidAddressOrKey:`` instead of comparing numbers.

The classes stay in the library's one error hierarchy: each is a
:class:`~btcchannel.errors.NodeError` (local code ``node_error``, HTTP 502), so the edges translate
them into messages and exit codes as any other error; the node's own code is in ``rpc_code``.
"""

from __future__ import annotations

from typing import TypeVar

from btcchannel.errors import NodeError

__all__ = [
    "RPC_ERRORS",
    "from_rpc",
    "RpcMiscError",
    "RpcTypeError",
    "RpcWalletError",
    "RpcInvalidAddressOrKey",
    "RpcInsufficientFunds",
    "RpcInvalidParameter",
    "RpcWalletNotFound",
    "RpcWalletNotSpecified",
    "RpcDeserializationError",
    "RpcVerifyError",
    "RpcVerifyRejected",
    "RpcAlreadyInChain",
    "RpcInWarmup",
    "RpcWalletAlreadyLoaded",
    "RpcMethodNotFound",
]

RPC_ERRORS: dict[int, type[NodeError]] = {}
"""The error class for each RPC error code that has one (filled by :func:`_registered`)."""

_N = TypeVar("_N", bound=type[NodeError])


def _registered(cls: _N) -> _N:
    """Register ``cls`` in :data:`RPC_ERRORS` under its ``RPC_ERROR_CODE`` (one class a code)."""
    assert cls.RPC_ERROR_CODE not in RPC_ERRORS, f"RPC code {cls.RPC_ERROR_CODE} has a class already"
    RPC_ERRORS[cls.RPC_ERROR_CODE] = cls
    return cls


def from_rpc(rpc_code: int, message: str) -> NodeError:
    """The error for an RPC error reply: the class registered for ``rpc_code``, else ``NodeError``.

    The wallet's "Insufficient funds" answer that some calls give as RPC_WALLET_ERROR (-4,
    ``fundrawtransaction``, ``walletcreatefundedpsbt``) is :class:`RpcInsufficientFunds` too
    (``rpc_code`` keeps the node's -4)."""
    if rpc_code == RpcWalletError.RPC_ERROR_CODE and "Insufficient funds" in message:
        return RpcInsufficientFunds(message, rpc_code=rpc_code)
    return RPC_ERRORS.get(rpc_code, NodeError)(message, rpc_code=rpc_code)


@_registered
class RpcMiscError(NodeError):
    """RPC_MISC_ERROR (-1): a failure without a more specific code (also raised by
    :class:`~btcchannel.bitcoind.rpc.Node` when a wallet step gives an unusable result)."""

    RPC_ERROR_CODE = -1


@_registered
class RpcTypeError(NodeError):
    """RPC_TYPE_ERROR (-3): a parameter of the wrong JSON type."""

    RPC_ERROR_CODE = -3


@_registered
class RpcWalletError(NodeError):
    """RPC_WALLET_ERROR (-4): an unspecified wallet error, e.g. ``fundrawtransaction``'s
    "Insufficient funds" or ``createwallet`` of a wallet that already exists."""

    RPC_ERROR_CODE = -4


@_registered
class RpcInvalidAddressOrKey(NodeError):
    """RPC_INVALID_ADDRESS_OR_KEY (-5): also "No such mempool or blockchain
    transaction" and an unknown block hash."""

    RPC_ERROR_CODE = -5


@_registered
class RpcInsufficientFunds(NodeError):
    """RPC_WALLET_INSUFFICIENT_FUNDS (-6): the wallet cannot pay (``sendtoaddress``); also the
    -4 "Insufficient funds" of the funding calls (see :func:`from_rpc`). The payer raises
    :class:`~btcchannel.errors.InsufficientFunds` for it when a funding fails."""

    RPC_ERROR_CODE = -6


@_registered
class RpcInvalidParameter(NodeError):
    """RPC_INVALID_PARAMETER (-8): e.g. a block height beyond the tip."""

    RPC_ERROR_CODE = -8


@_registered
class RpcWalletNotFound(NodeError):
    """RPC_WALLET_NOT_FOUND (-18): no wallet of that name is loaded."""

    RPC_ERROR_CODE = -18


@_registered
class RpcWalletNotSpecified(NodeError):
    """RPC_WALLET_NOT_SPECIFIED (-19): several wallets are loaded and the call named none."""

    RPC_ERROR_CODE = -19


@_registered
class RpcDeserializationError(NodeError):
    """RPC_DESERIALIZATION_ERROR (-22): a transaction or block that does not decode."""

    RPC_ERROR_CODE = -22


@_registered
class RpcVerifyError(NodeError):
    """RPC_VERIFY_ERROR (-25): e.g. missing or already spent inputs."""

    RPC_ERROR_CODE = -25


@_registered
class RpcVerifyRejected(NodeError):
    """RPC_VERIFY_REJECTED (-26): rejected by policy or consensus (e.g. ``non-final``)."""

    RPC_ERROR_CODE = -26


@_registered
class RpcAlreadyInChain(NodeError):
    """RPC_VERIFY_ALREADY_IN_CHAIN (-27): the transaction is already confirmed."""

    RPC_ERROR_CODE = -27


@_registered
class RpcInWarmup(NodeError):
    """RPC_IN_WARMUP (-28): the node is still starting. :class:`~btcchannel.bitcoind.rpc.Node`
    raises :class:`~btcchannel.errors.NodeUnavailable` instead, so this one never reaches its
    callers."""

    RPC_ERROR_CODE = -28


@_registered
class RpcWalletAlreadyLoaded(NodeError):
    """RPC_WALLET_ALREADY_LOADED (-35): ``loadwallet`` of a loaded wallet."""

    RPC_ERROR_CODE = -35


@_registered
class RpcMethodNotFound(NodeError):
    """RPC_METHOD_NOT_FOUND (-32601): the node has no such RPC (or it is disabled)."""

    RPC_ERROR_CODE = -32601
