"""A real regtest bitcoind: find it or fetch it, then run it.

- :func:`find_bitcoind` returns a usable ``bitcoind``: ``$BITCOIND``, else one on
  ``PATH`` (Bitcoin Core >= 25 or Bitcoin Knots), else Debian's ``bitcoin-knots``
  package fetched by :func:`fetch_bitcoind` into the user's cache folder and run
  through its own dynamic loader (so it works on a host with an older glibc).
- :class:`RegtestNode` owns one bitcoind process, modelled on Bitcoin Core's
  functional test framework: a fresh datadir, free ports, a generated
  ``bitcoin.conf``, an RPC readiness wait that fails fast with the log tail if
  the process died, named bech32 wallets, mining, and a clean stop.

RPC goes through the ``bitcoinrpc`` package. Its client is asynchronous, so the
node runs a private event loop on a thread and :meth:`RegtestNode.rpc` is a
plain blocking call that works from sync and async code alike.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btcchannel.amounts import btc_to_sat, sat_to_btc
from btcchannel.errors import BitcoindNotFound, NodeError, NodeUnavailable
from btcchannel.bitcoind.rpc import Node

MIN_CORE_MAJOR = 25
INSTALL_HINT = (
    "install Bitcoin Core 25 or newer (https://bitcoincore.org/en/download/) and put "
    "bitcoind on PATH or set BITCOIND=/path/to/bitcoind, or let btcchannel fetch "
    "Debian's bitcoin-knots package (needs apt-get and dpkg on a Debian or Ubuntu host)"
)
# Runtime of Debian's bitcoin-knots: these packages and the libraries they need.
KNOTS_PACKAGE = "bitcoin-knots"
KNOTS_ROOTS = (
    KNOTS_PACKAGE, "libc6", "libstdc++6", "libgcc-s1", "libsqlite3-0", "libzmq5",
    "libevent-core-2.1-7t64", "libevent-extra-2.1-7t64", "libevent-pthreads-2.1-7t64",
)
# Dependencies that are not shared libraries and are never needed to run bitcoind.
_NOT_RUNTIME = re.compile(
    r"^(debconf.*|cdebconf|systemd.*|opensysusers|adduser|init-system-helpers|"
    r"passwd|base-files|dpkg|perl.*|sensible-utils|lsb-base|tzdata|.*-common|.*-data)$"
)
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
_LIB_DIR = "usr/lib/x86_64-linux-gnu"


# --------------------------------------------------------------------------- binaries


@dataclass(frozen=True)
class BitcoindBinary:
    """How to run bitcoind and bitcoin-cli (a command prefix, maybe via a loader)."""

    bitcoind: tuple[str, ...]
    bitcoin_cli: tuple[str, ...]
    version: str
    source: str  # "env", "path" or "cache"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/btcchannel`` (default ``~/.cache/btcchannel``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "btcchannel"


def _version_of(cmd: tuple[str, ...]) -> str | None:
    try:
        out = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = (out.stdout or "").strip().splitlines()
    return first[0] if out.returncode == 0 and first else None


def _acceptable(version: str) -> bool:
    if "Knots" in version:
        return True
    m = re.search(r"Bitcoin Core.*?v(\d+)\.", version)
    return m is not None and int(m.group(1)) >= MIN_CORE_MAJOR


def _sibling_cli(bitcoind: str) -> str:
    cli = Path(bitcoind).with_name("bitcoin-cli")
    return str(cli) if cli.exists() else (shutil.which("bitcoin-cli") or "bitcoin-cli")


def find_bitcoind(fetch: bool = True) -> BitcoindBinary:
    """A usable bitcoind: ``$BITCOIND``, then ``PATH``, then the cache (fetching if needed)."""
    env = os.environ.get("BITCOIND")
    if env:
        version = _version_of((env,))
        if version is None or not _acceptable(version):
            raise BitcoindNotFound(
                f"BITCOIND={env} is not Bitcoin Core >= {MIN_CORE_MAJOR} or Bitcoin Knots "
                f"({version or 'it did not run'}); {INSTALL_HINT}"
            )
        return BitcoindBinary((env,), (_sibling_cli(env),), version, "env")
    on_path = shutil.which("bitcoind")
    if on_path:
        version = _version_of((on_path,))
        if version is not None and _acceptable(version):
            return BitcoindBinary((on_path,), (_sibling_cli(on_path),), version, "path")
    cached = _cached_binary(cache_dir() / "knots")
    if cached is not None:
        return cached
    if not fetch:
        raise BitcoindNotFound(f"no bitcoind found; {INSTALL_HINT}")
    return fetch_bitcoind()


def _loader_prefix(root: Path, program: str) -> tuple[str, ...]:
    lib = root / _LIB_DIR
    return (str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib), str(root / "usr/bin" / program))


def _cached_binary(root: Path) -> BitcoindBinary | None:
    marker = root / ".complete"
    if not marker.exists():
        return None
    prefix = _loader_prefix(root, "bitcoind")
    version = _version_of(prefix)
    if version is None:
        return None
    return BitcoindBinary(prefix, _loader_prefix(root, "bitcoin-cli"), version, "cache")


def _apt_value(name: str) -> str:
    out = subprocess.run(["apt-config", "shell", "V", name], capture_output=True, text=True, check=False)
    m = re.match(r"V='(.*)'", out.stdout.strip())
    return m.group(1) if m else ""


def debian_archive_uri() -> str:
    """The Debian archive URI this machine's own apt configuration uses."""
    etc = Path("/etc/apt")
    sourcelist = _apt_value("Dir::Etc::sourcelist") or "sources.list"
    parts = _apt_value("Dir::Etc::sourceparts") or "sources.list.d"
    files: list[Path] = []
    main_list = Path(sourcelist) if sourcelist.startswith("/") else etc / sourcelist
    parts_dir = Path(parts) if parts.startswith("/") else etc / parts
    if main_list.exists():
        files.append(main_list)
    if parts_dir.is_dir():
        files.extend(sorted(p for p in parts_dir.iterdir() if p.suffix in (".list", ".sources")))
    candidates: list[str] = []
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    key, sep, value = line.partition(":")
                    if sep and not line.lstrip().startswith("#") and not line[:1].isspace():
                        fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
                    continue
                suites = fields.get("suites", "")
                for uri in fields.get("uris", "").split():
                    if "security" not in suites and "security" not in uri:
                        candidates.append(uri)
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and "security" not in m.group(1) and "security" not in m.group(2):
                    candidates.append(m.group(1))
    for uri in candidates:
        if uri.rstrip("/").endswith("/debian") or "debian" in uri:
            return uri.rstrip("/")
    raise BitcoindNotFound(f"no Debian archive in this machine's apt sources; {INSTALL_HINT}")


def _apt_options(work: Path) -> list[str]:
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=False).stdout.strip()
    return [
        "-o", f"Dir::Etc::sourcelist={work / 'btcchannel.sources'}",
        "-o", "Dir::Etc::sourceparts=/dev/null",
        "-o", f"Dir::State::Lists={work / 'lists'}",
        "-o", "Dir::State::status=/dev/null",
        "-o", f"Dir::Cache={work / 'cache'}",
        "-o", "Debug::NoLocking=1",
        "-o", f"APT::Sandbox::User={user or 'root'}",
        "-q",
    ]


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False, timeout=900)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise BitcoindNotFound(f"{cmd[0]} failed: {' | '.join(tail)}; {INSTALL_HINT}")
    return out.stdout


def _runtime_closure(apt: list[str]) -> list[str]:
    """The packages bitcoind needs at run time: the roots plus their library dependencies."""
    seen: set[str] = set()
    todo = list(KNOTS_ROOTS)
    while todo:
        batch = [p for p in dict.fromkeys(todo) if p not in seen]
        todo = []
        if not batch:
            break
        seen.update(batch)
        out = _run(["apt-cache", *apt, "depends", "--no-recommends", "--no-suggests",
                    "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *batch])
        for line in out.splitlines():
            m = re.match(r"\s*\|?(?:Pre)?Depends:\s+(\S+)", line)
            if not m or m.group(1).startswith("<"):
                continue
            dep = m.group(1).split(":")[0]
            if dep not in seen and not _NOT_RUNTIME.match(dep) and dep.startswith("lib"):
                todo.append(dep)
    return sorted(seen)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_bitcoind(cache: Path | None = None) -> BitcoindBinary:
    """Fetch Debian unstable's bitcoin-knots and its runtime libraries into the cache.

    Idempotent and safe to interrupt: everything is unpacked into a staging
    folder that is renamed into place only once bitcoind has run from it.
    """
    base = cache or cache_dir()
    root = base / "knots"
    with _file_lock(base / "knots.lock"):
        cached = _cached_binary(root)
        if cached is not None:
            return cached
        for tool in ("apt-get", "apt-cache", "apt-config", "dpkg"):
            if shutil.which(tool) is None:
                raise BitcoindNotFound(f"no bitcoind found and {tool} is missing; {INSTALL_HINT}")
        if not ARCHIVE_KEYRING.exists():
            raise BitcoindNotFound(f"no bitcoind found and no {ARCHIVE_KEYRING}; {INSTALL_HINT}")
        uri = debian_archive_uri()
        base.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="knots-", dir=base) as tmp:
            work = Path(tmp)
            for sub in ("lists/partial", "cache/archives/partial", "debs", "root"):
                (work / sub).mkdir(parents=True)
            (work / "btcchannel.sources").write_text(
                f"Types: deb\nURIs: {uri}\nSuites: unstable\nComponents: main\n"
                f"Signed-By: {ARCHIVE_KEYRING}\n"
            )
            apt = _apt_options(work)
            _run(["apt-get", *apt, "update"])
            packages = _runtime_closure(apt)
            _run(["apt-get", *apt, "download", *packages], cwd=work / "debs")
            for deb in sorted((work / "debs").glob("*.deb")):
                _run(["dpkg", "-x", str(deb), str(work / "root")])
            staged = work / "root"
            version = _version_of(_loader_prefix(staged, "bitcoind"))
            if version is None:
                raise BitcoindNotFound(f"the fetched bitcoind does not run; {INSTALL_HINT}")
            (staged / ".complete").write_text(version + "\n")
            if root.exists():
                shutil.rmtree(root)
            staged.rename(root)
        found = _cached_binary(root)
        if found is None:
            raise BitcoindNotFound(f"the fetched bitcoind does not run; {INSTALL_HINT}")
        return found


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> None:
    """Poll ``predicate`` until it is true; ``TimeoutError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        event.wait(interval)


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
    """One regtest bitcoind process in its own datadir, on free loopback ports."""

    def __init__(
        self,
        datadir: Path | None = None,
        binary: BitcoindBinary | None = None,
        extra_args: tuple[str, ...] = (),
        rpc_timeout: float = 120.0,
        die_with_parent: bool = True,
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
        self.record_file.write_text(json.dumps({
            "pid": self.pid, "rpc_port": self.rpc_port, "p2p_port": self.p2p_port,
            "rpc_user": self.rpc_user, "rpc_password": self.rpc_password,
        }))
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
        conf = "\n".join([
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
            "txindex=1",
            "fallbackfee=0.0002",
            # mainnet's policy, so every transaction accepted here is one a real node accepts
            "acceptnonstdtxn=0",
            "keypool=10",
            "printtoconsole=0",
            "shrinkdebugfile=0",
            "rpcworkqueue=64",
            "",
        ])
        (self.datadir / "bitcoin.conf").write_text(conf)

    def log_tail(self, lines: int = 25) -> str:
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
            if attempt > 0 or not (self.rpc_port and self.p2p_port):
                # a restart keeps its ports (so clients keep their URL) unless they are taken
                self.rpc_port, self.p2p_port = free_port(), free_port()
            self._write_conf()
            stdout = open(self.datadir / "stdout.log", "ab")
            stderr = open(self.datadir / "stderr.log", "ab")
            try:
                self.process = subprocess.Popen(
                    [*self.binary.bitcoind, f"-datadir={self.datadir}", *self.extra_args],
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
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
        deadline = time.monotonic() + timeout
        assert self.process is not None
        while True:
            code = self.process.poll()
            if code is not None:
                raise NodeUnavailable(f"bitcoind exited with status {code} during startup")
            try:
                self.rpc("getblockchaininfo")
                return
            except NodeError as e:
                if e.rpc_code not in (-28, -342):  # warming up
                    raise
            except NodeUnavailable:
                pass
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
            wait_until(lambda: not _pid_alive(pid), timeout, 0.1, what=f"bitcoind pid {pid} to exit")
        except TimeoutError:
            _signal(pid, signal.SIGKILL)
        self._attached_pid = None
        self.record_file.unlink(missing_ok=True)

    def is_running(self) -> bool:
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
        return int(self.rpc("getblockcount"))

    def create_wallet(self, name: str) -> None:
        """Create (or load) a descriptor wallet."""
        try:
            self.rpc("createwallet", name)
        except NodeError as e:
            if e.rpc_code != -4:  # already exists
                raise
            try:
                self.rpc("loadwallet", name)
            except NodeError as e2:
                if e2.rpc_code != -35:  # already loaded
                    raise

    def new_address(self, wallet: str) -> str:
        """A fresh bech32 (P2WPKH) address; Knots would hand out legacy ones by default."""
        return str(self.rpc("getnewaddress", "", "bech32", wallet=wallet))

    def mine(self, n: int, address: str | None = None) -> list[str]:
        if address is None:
            if self._mining_address is None:
                self.create_wallet("miner")
                self._mining_address = self.new_address("miner")
            address = self._mining_address
        return [str(h) for h in self.rpc("generatetoaddress", n, address)]

    def balance_sat(self, wallet: str) -> int:
        return btc_to_sat(self.rpc("getbalance", wallet=wallet))

    def send(self, wallet: str, address: str, amount_sat: int) -> str:
        """Pay ``amount_sat`` to ``address``; checked to be in the mempool."""
        txid = str(self.rpc("sendtoaddress", address, sat_to_btc(amount_sat), wallet=wallet))
        if txid not in self.rpc("getrawmempool"):
            raise NodeError(f"sendtoaddress returned {txid} but it is not in the mempool")
        return txid

    def connect(self, other: "RegtestNode") -> None:
        self.rpc("addnode", f"127.0.0.1:{other.p2p_port}", "onetry")
        wait_until(lambda: len(self.rpc("getpeerinfo")) > 0, 30, what="peer connection")

    def status(self) -> dict[str, Any]:
        info = self.rpc("getblockchaininfo")
        return {
            "chain": info["chain"], "blocks": info["blocks"], "bestblockhash": info["bestblockhash"],
            "rpc_url": self.rpc_url, "datadir": str(self.datadir), "pid": self.pid,
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
