"""Block announcements from the node over ZMQ (bitcoind's ``-zmqpubhashblock``).

A notification only wakes a waiter early: it carries no data anyone relies on (the block follower
in :mod:`btcchannel.bitcoind.chain` still fetches every block), and ZMQ may drop messages (a
reconnect, a full queue), so every waiter keeps its own poll interval as the safety net.

::

    notifier = await BlockNotifier.discover(node)   # None: the node publishes no hashblock
    seen = notifier.count                           # before a pass
    ...                                             # the pass
    await notifier.wait(seen, timeout=30.0)         # at once if a block was announced meanwhile
    await notifier.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import zmq
import zmq.asyncio

from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeError

__all__ = ["BlockNotifier", "hashblock_endpoint"]

log = logging.getLogger("btcchannel.bitcoind.notify")

_TOPIC = b"hashblock"


async def hashblock_endpoint(node: Node) -> str | None:
    """The address the node publishes new block hashes on (``getzmqnotifications``); None if it
    publishes none or cannot say (a node built without ZMQ has no such RPC)."""
    try:
        entries = await node.call("getzmqnotifications")
    except NodeError as err:
        log.info("no block notifications from the node (%s): polling only", err)
        return None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and entry.get("type") == "pubhashblock" and isinstance(entry.get("address"), str):
            return str(entry["address"])
    return None


class BlockNotifier:
    """A subscriber to the node's ``hashblock`` topic that counts the announcements and wakes waiters.

    Any number of tasks may wait; each passes the count it last saw, so an announcement that
    arrived while it was busy wakes it at once instead of being lost.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.count = 0  # announcements received so far
        # resolved (and replaced) at each announcement; waiters use asyncio.wait, which never
        # swallows their own cancellation (asyncio.wait_for can, on Python 3.11)
        self._next: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._context = zmq.asyncio.Context()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        # ZMTP heartbeats: a silently dead connection is noticed and re-established
        self._socket.setsockopt(zmq.HEARTBEAT_IVL, 10_000)
        self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 30_000)
        self._socket.setsockopt(zmq.SUBSCRIBE, _TOPIC)
        self._socket.connect(endpoint)  # asynchronous: ZMQ connects (and reconnects) by itself
        self._task = asyncio.ensure_future(self._receive())

    @classmethod
    async def discover(cls, node: Node) -> BlockNotifier | None:
        """A subscriber to the endpoint the node reports, or None when it reports none."""
        endpoint = await hashblock_endpoint(node)
        if endpoint is None:
            return None
        log.info("new blocks announced by the node on %s", endpoint)
        return cls(endpoint)

    async def _receive(self) -> None:
        while True:
            try:
                parts = await self._socket.recv_multipart()
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as err:
                if err.errno == zmq.ETERM or self._socket.closed:
                    return
                log.warning("block notification lost: %s", err)
                continue
            if not parts or parts[0] != _TOPIC:
                continue
            self.count += 1
            announced, self._next = self._next, asyncio.get_running_loop().create_future()
            announced.set_result(None)

    async def wait(self, seen: int, timeout: float) -> bool:
        """Wait until more than ``seen`` blocks were announced, at most ``timeout`` seconds; whether
        one was (False: the timeout, the caller polls)."""
        if self.count <= seen:
            await asyncio.wait({self._next}, timeout=timeout)
        return self.count > seen

    async def aclose(self) -> None:
        """Stop receiving and release the socket."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._socket.close(linger=0)
        self._context.term()
