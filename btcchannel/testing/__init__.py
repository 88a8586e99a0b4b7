"""Helpers that tests, benchmarks and the demo share, and the pytest plugin (:mod:`.plugin`).

- waiting: :func:`wait_until`, :func:`wait_until_async` (from :mod:`btcchannel.wait`);
- the node: :func:`node_for`, :func:`sats`, :func:`tx_of`, :class:`Chain`, :class:`TxView`, :class:`ChannelView`,
  :func:`assert_node_error`, :func:`assert_node_error_async` (:mod:`.chain`);
- the payee: :func:`fast_config`, :func:`start_payee`, :func:`running_payee`,
  :class:`RunningPayee`, :class:`ServerProcess` (:mod:`.payee`);
- the payer: :func:`open_channel`, :func:`wait_status`, :func:`wait_close_broadcast`,
  :func:`confirm_close` (:mod:`.payer`).
"""

from btcchannel.testing.chain import (
    Chain,
    ChannelView,
    TxView,
    assert_node_error,
    assert_node_error_async,
    node_for,
    sats,
    tx_of,
)
from btcchannel.testing.payee import (
    PAYEE_MODULE,
    RunningPayee,
    ServerProcess,
    fast_config,
    running_payee,
    start_payee,
)
from btcchannel.testing.payer import confirm_close, mining, open_channel, wait_close_broadcast, wait_status
from btcchannel.wait import wait_until, wait_until_async

__all__ = [
    "PAYEE_MODULE",
    "Chain",
    "ChannelView",
    "RunningPayee",
    "ServerProcess",
    "TxView",
    "assert_node_error",
    "assert_node_error_async",
    "confirm_close",
    "fast_config",
    "mining",
    "node_for",
    "open_channel",
    "running_payee",
    "sats",
    "start_payee",
    "tx_of",
    "wait_close_broadcast",
    "wait_status",
    "wait_until",
    "wait_until_async",
]
