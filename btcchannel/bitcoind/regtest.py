"""A real regtest bitcoind, run as a child process.

:class:`RegtestNode` owns one bitcoind process, modelled on Bitcoin Core's
functional test framework (``test_framework/test_node.py``): a fresh datadir,
free ports, a generated ``bitcoin.conf`` (announcing new blocks on a loopback ZMQ
``pubhashblock`` endpoint unless ``zmq=False``), an RPC readiness wait that fails fast
with the log tail if the process died, named bech32 wallets, mining, and a clean
stop (RPC ``stop``, then SIGTERM, then SIGKILL). A node can be left running
(:meth:`RegtestNode.detach`) and reached again later (:meth:`RegtestNode.attach`,
:func:`recorded_rpc`).

RPC goes through :class:`btcchannel.bitcoind.rpc.Node`. Its client is
asynchronous, so the node runs a private event loop on a thread and
:meth:`RegtestNode.rpc` is a plain blocking call that works from sync and async
code alike.

Which bitcoind to run is decided by :mod:`btcchannel.bitcoind.binary`; its names
are re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.bitcoind.binary import BitcoindBinary, find_bitcoind
from btcchannel.bitcoind.errors import RpcInvalidAddressOrKey, RpcWalletAlreadyLoaded, RpcWalletError
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeError, NodeUnavailable
from btcchannel.wait import wait_until

__all__ = [
    "RegtestNode",
    "free_port",
    "recorded_rpc",
]

# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- RPC


class _RpcLoop:
    """A private event loop on a daemon thread, carrying an async :class:`~btcchannel.bitcoind.rpc.Node`."""

    def __init__(self, url: str, auth: tuple[str, str], timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bitcoind-rpc", daemon=True)
        self._thread.start()
        self._node = Node(url, auth=auth, timeout=timeout)

    def call(self, method: str, params: list[Any], wallet: str | None) -> Any:
        fut = asyncio.run_coroutine_threadsafe(self._node.call(method, *params, wallet=wallet), self._loop)
        try:
            return fut.result(self._timeout + 10)
        except FutureTimeout as e:
            fut.cancel()
            raise NodeUnavailable(f"{method}: no answer in {self._timeout:.0f}s") from e

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._node.aclose(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _rpcauth_line(user: str, password: str) -> str:
    salt = secrets.token_hex(16)
    digest = hmac.new(salt.encode(), password.encode(), hashlib.sha256).hexdigest()
    return f"rpcauth={user}:{salt}${digest}"


_LIVE: "weakref.WeakSet[RegtestNode]" = weakref.WeakSet()


def _stop_all_at_exit() -> None:
    for node in list(_LIVE):
        node.stop()


atexit.register(_stop_all_at_exit)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it only waits for its parent to reap it
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def recorded_rpc(datadir: Path) -> tuple[str, str, str] | None:
    """``(url, user, password)`` of a node left running in ``datadir`` by :meth:`RegtestNode.detach`."""
    try:
        rec = json.loads((Path(datadir) / "node.json").read_text())
        if not _pid_alive(int(rec["pid"])):
            return None
        return f"http://127.0.0.1:{int(rec['rpc_port'])}", str(rec["rpc_user"]), str(rec["rpc_password"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RegtestNode:
    """One regtest bitcoind process in its own datadir, on free loopback ports.

    By default the node keeps every block and a transaction index; ``txindex=False`` and
    ``prune`` (MiB, or 1 for ``pruneblockchain`` only; with ``fastprune`` regtest's small blocks
    fill block files fast enough to be pruned) run it as many operators do, and
    ``persist_mempool=False`` makes a restart lose the mempool."""

    def __init__(
        self,
        datadir: Path | None = None,
        binary: BitcoindBinary | None = None,
        extra_args: tuple[str, ...] = (),
        rpc_timeout: float = 120.0,
        die_with_parent: bool = True,
        zmq: bool = True,
        *,
        txindex: bool = True,
        prune: int = 0,
        fastprune: bool = False,
        persist_mempool: bool = True,
    ) -> None:
        self.binary = binary or find_bitcoind()
        self.datadir = Path(datadir) if datadir else Path(tempfile.mkdtemp(prefix="btcchannel-regtest-"))
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.extra_args = extra_args
        self.rpc_timeout = rpc_timeout
        self.die_with_parent = die_with_parent
        self.rpc_user = "btcchannel"
        self.rpc_password = secrets.token_hex(16)
        self.rpc_port = 0
        self.p2p_port = 0
        self.zmq = zmq  # publish new block hashes (-zmqpubhashblock) on zmq_port
        self.zmq_port = 0
        # the node's storage, as operators run it (read at each start: change them, then restart)
        self.txindex = txindex  # -txindex (incompatible with prune)
        self.prune = prune  # -prune: 0 keeps every block, 1 prunes only on pruneblockchain, else MiB
        self.fastprune = fastprune  # -fastprune: tiny block files, so regtest blocks can be pruned at all
        self.persist_mempool = persist_mempool  # -persistmempool: False restarts with an empty mempool
        self.process: subprocess.Popen[bytes] | None = None
        self._rpc_loop: _RpcLoop | None = None
        self._mining_address: str | None = None
        self._attached_pid: int | None = None

    # ---- paths and addresses
    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.rpc_port}"

    @property
    def cookie_file(self) -> Path:
        return self.datadir / "regtest" / ".cookie"

    @property
    def debug_log(self) -> Path:
        return self.datadir / "regtest" / "debug.log"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else self._attached_pid

    @property
    def record_file(self) -> Path:
        return self.datadir / "node.json"

    def detach(self) -> None:
        """Leave the process running past this Python process (recorded in ``node.json``)."""
        self.record_file.write_text(
            json.dumps(
                {
                    "pid": self.pid,
                    "rpc_port": self.rpc_port,
                    "p2p_port": self.p2p_port,
                    "rpc_user": self.rpc_user,
                    "rpc_password": self.rpc_password,
                }
            )
        )
        self.record_file.chmod(0o600)
        _LIVE.discard(self)
        if self._rpc_loop is not None:
            self._rpc_loop.close()
            self._rpc_loop = None
        self.process = None

    @classmethod
    def attach(cls, datadir: Path, binary: BitcoindBinary | None = None) -> "RegtestNode":
        """Reach a node started earlier with :meth:`detach` (``NodeUnavailable`` if it is gone)."""
        try:
            rec = json.loads((Path(datadir) / "node.json").read_text())
        except (OSError, ValueError) as e:
            raise NodeUnavailable(f"no regtest node recorded in {datadir}") from e
        node = cls(datadir=Path(datadir), binary=binary)
        node.rpc_port, node.p2p_port = int(rec["rpc_port"]), int(rec["p2p_port"])
        node.rpc_user, node.rpc_password = str(rec["rpc_user"]), str(rec["rpc_password"])
        node._attached_pid = int(rec["pid"])
        if not _pid_alive(node._attached_pid):
            raise NodeUnavailable(f"the regtest node in {datadir} (pid {rec['pid']}) is not running")
        node._rpc_loop = _RpcLoop(node.rpc_url, (node.rpc_user, node.rpc_password), node.rpc_timeout)
        return node

    def _write_conf(self) -> None:
        conf = "\n".join(
            [
                "regtest=1",
                "[regtest]",
                f"port={self.p2p_port}",
                f"rpcport={self.rpc_port}",
                "bind=127.0.0.1",
                "rpcbind=127.0.0.1",
                "rpcallowip=127.0.0.1",
                _rpcauth_line(self.rpc_user, self.rpc_password),
                "server=1",
                "listen=1",
                "listenonion=0",
                "dnsseed=0",
                "fixedseeds=0",
                "discover=0",
                "natpmp=0",
                f"txindex={int(self.txindex and not self.prune)}",
                f"prune={self.prune}",
                *(["fastprune=1"] if self.fastprune else []),
                f"persistmempool={int(self.persist_mempool)}",
                "fallbackfee=0.0002",
                # mainnet's policy, so every transaction accepted here is one a real node accepts
                "acceptnonstdtxn=0",
                "keypool=10",
                "printtoconsole=0",
                "shrinkdebugfile=0",
                "rpcworkqueue=64",
                *([f"zmqpubhashblock=tcp://127.0.0.1:{self.zmq_port}"] if self.zmq else []),
                "",
            ]
        )
        (self.datadir / "bitcoin.conf").write_text(conf)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` of ``debug.log`` and of bitcoind's stderr."""
        parts = []
        for path in (self.debug_log, self.datadir / "stderr.log"):
            if path.exists():
                parts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(parts)

    # ---- lifecycle
    def start(self, timeout: float = 60.0) -> "RegtestNode":
        """Start bitcoind and wait until its RPC answers (fail fast if it dies)."""
        if self.process is not None and self.process.poll() is None:
            return self
        for attempt in range(3):
            if attempt > 0 or not (self.rpc_port and self.p2p_port and (self.zmq_port or not self.zmq)):
                # a restart keeps its ports (so clients keep their URL) unless they are taken
                self.rpc_port, self.p2p_port = free_port(), free_port()
                self.zmq_port = free_port() if self.zmq else 0
            self._write_conf()
            stdout = open(self.datadir / "stdout.log", "ab")
            stderr = open(self.datadir / "stderr.log", "ab")
            try:
                self.process = subprocess.Popen(
                    [*self.binary.bitcoind, f"-datadir={self.datadir}", *self.extra_args],
                    stdin=subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    preexec_fn=_die_with_parent if self.die_with_parent else None,
                    start_new_session=not self.die_with_parent,
                )
            finally:
                stdout.close()
                stderr.close()
            _LIVE.add(self)
            self._rpc_loop = _RpcLoop(self.rpc_url, (self.rpc_user, self.rpc_password), self.rpc_timeout)
            try:
                self.wait_for_rpc_connection(timeout)
                return self
            except NodeUnavailable as e:
                bind_failed = "Unable to bind" in self.log_tail(50)
                self.stop()
                if not bind_failed or attempt == 2:
                    raise NodeUnavailable(f"{e}\n--- log tail ---\n{self.log_tail()}") from e
        return self

    def wait_for_rpc_connection(self, timeout: float = 60.0) -> None:
        """Wait until the RPC answers; ``NodeUnavailable`` at once if the process exits."""
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                raise NodeUnavailable(f"bitcoind exited with status {code} during startup")
            try:
                self.rpc("getblockchaininfo")
                return
            except NodeUnavailable:
                pass  # not listening yet, or still warming up (Node reports RPC_IN_WARMUP so)
            if time.monotonic() >= deadline:
                raise NodeUnavailable(f"bitcoind RPC not ready after {timeout:.0f}s")
            try:
                self.process.wait(0.1)  # also notices an early exit
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout: float = 60.0) -> None:
        """Stop bitcoind cleanly (RPC ``stop``, then SIGTERM, then SIGKILL)."""
        if self.process is None and self._attached_pid is not None:
            self._stop_attached(self._attached_pid, timeout)
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                self.rpc("stop")
            except (NodeError, NodeUnavailable):
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._rpc_loop is not None:
            self._rpc_loop.close()
            self._rpc_loop = None
        _LIVE.discard(self)

    def _stop_attached(self, pid: int, timeout: float) -> None:
        try:
            self.rpc("stop")
        except (NodeError, NodeUnavailable):
            _signal(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not _pid_alive(pid), timeout=timeout, interval=0.1, what=f"bitcoind pid {pid} to exit")
        except TimeoutError:
            _signal(pid, signal.SIGKILL)
        self._attached_pid = None
        self.record_file.unlink(missing_ok=True)

    def is_running(self) -> bool:
        """Whether the bitcoind process (started or attached) is alive."""
        if self.process is None:
            return self._attached_pid is not None and _pid_alive(self._attached_pid)
        return self.process.poll() is None

    def __enter__(self) -> "RegtestNode":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- RPC
    def rpc(self, method: str, *params: Any, wallet: str | None = None) -> Any:
        """Call bitcoind; ``NodeError`` for an RPC error, ``NodeUnavailable`` if unreachable."""
        if self._rpc_loop is None:
            raise NodeUnavailable("the node is not running")
        return self._rpc_loop.call(method, list(params), wallet)

    def tip_height(self) -> int:
        """The height of the node's best block."""
        return int(self.rpc("getblockcount"))

    def transaction(self, txid: str, verbosity: int = 1, search_blocks: int = 2_000) -> dict[str, Any]:
        """``getrawtransaction txid verbosity``, also without a transaction index: a confirmed
        transaction is looked for in the last ``search_blocks`` blocks (newest first) and read from
        its block. :class:`~btcchannel.bitcoind.errors.RpcInvalidAddressOrKey` if it is not found."""
        try:
            return dict(self.rpc("getrawtransaction", txid, verbosity))
        except RpcInvalidAddressOrKey:
            if self.txindex and not self.prune:
                raise
        tip = self.tip_height()
        for height in range(tip, max(-1, tip - search_blocks), -1):
            block_hash = str(self.rpc("getblockhash", height))
            if txid in self.rpc("getblock", block_hash, 1)["tx"]:
                return dict(self.rpc("getrawtransaction", txid, verbosity, block_hash))
        raise RpcInvalidAddressOrKey(
            f"transaction {txid} is neither in the mempool nor in the last {search_blocks} blocks"
        )

    def create_wallet(self, name: str) -> None:
        """Create (or load) a descriptor wallet."""
        try:
            self.rpc("createwallet", name)
        except RpcWalletError:  # it already exists
            try:
                self.rpc("loadwallet", name)
            except RpcWalletAlreadyLoaded:
                pass

    def new_address(self, wallet: str) -> str:
        """A fresh bech32 (P2WPKH) address; Knots would hand out legacy ones by default."""
        return str(self.rpc("getnewaddress", "", "bech32", wallet=wallet))

    def mine(self, n: int, address: str | None = None) -> list[str]:
        """Mine ``n`` blocks (to the ``miner`` wallet unless ``address``); their hashes."""
        if address is None:
            if self._mining_address is None:
                self.create_wallet("miner")
                self._mining_address = self.new_address("miner")
            address = self._mining_address
        return [str(h) for h in self.rpc("generatetoaddress", n, address)]

    def balance_sat(self, wallet: str) -> int:
        """The wallet's balance (``getbalance``: trusted coins) in satoshis."""
        return btc_to_sat(self.rpc("getbalance", wallet=wallet))

    def send(self, wallet: str, address: str, amount_sat: int) -> str:
        """Pay ``amount_sat`` to ``address``; checked to be in the mempool."""
        txid = str(self.rpc("sendtoaddress", address, sat_to_btc(amount_sat), wallet=wallet))
        if txid not in self.rpc("getrawmempool"):
            raise NodeError(f"sendtoaddress returned {txid} but it is not in the mempool")
        return txid

    def connect(self, other: "RegtestNode") -> None:
        """Connect to ``other`` over P2P and wait until the peer is there."""
        self.rpc("addnode", f"127.0.0.1:{other.p2p_port}", "onetry")
        wait_until(lambda: len(self.rpc("getpeerinfo")) > 0, timeout=30, what="peer connection")

    def status(self) -> dict[str, Any]:
        """Chain, height, best block, RPC URL, datadir, pid and version (for the CLI)."""
        info = self.rpc("getblockchaininfo")
        return {
            "chain": info["chain"],
            "blocks": info["blocks"],
            "bestblockhash": info["bestblockhash"],
            "rpc_url": self.rpc_url,
            "datadir": str(self.datadir),
            "pid": self.pid,
            "version": self.binary.version,
        }

    def prepare(self, height: int = 201) -> None:
        """Mine to ``height`` (past the heights where Knots refuses wallet locktimes)."""
        tip = self.tip_height()
        if tip < height:
            self.mine(height - tip)

    def fund_wallet(self, wallet: str, amount_sat: int) -> str:
        """Create ``wallet`` and give it ``amount_sat``, confirmed."""
        self.create_wallet(wallet)
        txid = self.send("miner", self.new_address(wallet), amount_sat)
        self.mine(1)
        return txid
