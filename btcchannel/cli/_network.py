"""Finding the node as ``bitcoin-cli`` does: the library's :mod:`btcchannel.bitcoind.locate`."""

from __future__ import annotations

from btcchannel.bitcoind.locate import (
    DEFAULT_RPC_PORT,
    NodeAccess,
    bitcoin_default_datadir,
    derive_node_access,
    read_bitcoin_conf,
)

__all__ = ["DEFAULT_RPC_PORT", "NodeAccess", "bitcoin_default_datadir", "derive_node_access", "read_bitcoin_conf"]
