"""Finding the node as ``bitcoin-cli`` does: the network's RPC port, cookie and ``bitcoin.conf``;
:func:`find_node` is what the command line and a seller's program both use.

Bitcoin Core keeps each network's files in a subfolder of its datadir (``testnet3``,
``testnet4``, ``signet``, ``regtest``; mainnet in the datadir itself) and listens for RPC on
the network's port unless ``rpcport`` says otherwise. ``bitcoin.conf`` (``-conf``, by default
in the datadir) is read the way bitcoind reads it: ``key=value`` lines, network sections
(``[main]``, ``[test]``, ``[testnet4]``, ``[signet]``, ``[regtest]``) that win over the top
level, and network-only options (``rpcport``, ``rpcbind``...) that the top level sets only for
mainnet.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from btcchannel.bitcoind.regtest import recorded_rpc
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeUnavailable

__all__ = [
    "DEFAULT_RPC_PORT",
    "NodeAccess",
    "NodeEndpoint",
    "bitcoin_default_datadir",
    "check_reachable",
    "check_rpc_url",
    "default_datadir",
    "derive_node_access",
    "find_node",
    "locate_node",
    "node_client",
    "read_bitcoin_conf",
]

DEFAULT_RPC_PORT: dict[str, int] = {
    "mainnet": 8332,
    "testnet": 18332,
    "testnet4": 48332,
    "signet": 38332,
    "regtest": 18443,
}
NETWORK_SUBDIR: dict[str, str] = {
    "mainnet": "",
    "testnet": "testnet3",
    "testnet4": "testnet4",
    "signet": "signet",
    "regtest": "regtest",
}
CONF_SECTION: dict[str, str] = {
    "mainnet": "main",
    "testnet": "test",
    "testnet4": "testnet4",
    "signet": "signet",
    "regtest": "regtest",
}
# options bitcoind takes from the top level only for mainnet (the rest of the networks need a section)
_NETWORK_ONLY = frozenset({"rpcport", "rpcbind", "port", "bind", "wallet", "addnode", "connect"})


@dataclass(frozen=True)
class NodeAccess:
    """Where the node's RPC is and how to log in (a cookie file, or a user and password)."""

    url: str
    cookie: Path | None
    user: str | None
    password: str | None


def bitcoin_default_datadir() -> Path:
    """Bitcoin Core's default datadir on this system (``~/.bitcoin`` on Linux)."""
    home = Path.home()
    if os.name == "nt":
        return Path(os.environ.get("APPDATA", str(home))) / "Bitcoin"
    if (home / "Library" / "Application Support").is_dir():
        return home / "Library" / "Application Support" / "Bitcoin"
    return home / ".bitcoin"


def read_bitcoin_conf(path: Path, network: str) -> dict[str, str]:
    """The options of ``path`` that apply to ``network`` (last value of a key wins); {} if no file."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    top: dict[str, str] = {}
    sections: dict[str, dict[str, str]] = {}
    current = top
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), {})
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip()
        net, dot, bare = key.partition(".")
        if dot:  # "regtest.rpcport=..." is the section form on one line
            sections.setdefault(net, {})[bare] = value.strip()
        else:
            current[key] = value.strip()
    conf = {k: v for k, v in top.items() if network == "mainnet" or k not in _NETWORK_ONLY}
    conf.update(sections.get(CONF_SECTION[network], {}))
    return conf


def derive_node_access(
    network: str, bitcoin_datadir: Path | None, bitcoin_conf: Path | None, rpc_url: str | None = None
) -> NodeAccess:
    """The RPC URL and credentials of ``network``'s node as bitcoin-cli derives them.

    ``rpc_url`` (when given) wins over ``rpcconnect``/``rpcport``; ``rpcuser``/``rpcpassword``
    from the conf win over the cookie (``rpccookiefile``, else ``<datadir>/<network>/.cookie``).
    """
    base = bitcoin_datadir
    conf_path = bitcoin_conf or (base or bitcoin_default_datadir()) / "bitcoin.conf"
    conf = read_bitcoin_conf(conf_path, network)
    if base is None:
        base = Path(conf["datadir"]).expanduser() if conf.get("datadir") else bitcoin_default_datadir()
    netdir = base / NETWORK_SUBDIR[network]
    url = rpc_url or "http://{}:{}".format(
        conf.get("rpcconnect", "127.0.0.1"), conf.get("rpcport", DEFAULT_RPC_PORT[network])
    )
    if conf.get("rpcpassword"):
        return NodeAccess(url, None, conf.get("rpcuser", ""), conf["rpcpassword"])
    cookie = Path(conf["rpccookiefile"]) if conf.get("rpccookiefile") else netdir / ".cookie"
    if not cookie.is_absolute():
        cookie = netdir / cookie
    return NodeAccess(url, cookie, None, None)


def default_datadir() -> Path:
    """btcchannel's own state: ``$XDG_DATA_HOME/btcchannel`` (``~/.local/share/btcchannel`` without it)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "btcchannel"


@dataclass(frozen=True)
class NodeEndpoint:
    """Where the node is and how to log in (a user and password, or a cookie file)."""

    url: str
    user: str | None
    password: str | None
    cookie: Path | None
    source: str  # how it was found, in words


def locate_node(
    network: str = "regtest",
    *,
    rpc_url: str | None = None,
    rpc_cookie: Path | None = None,
    rpc_user: str | None = None,
    rpc_password: str | None = None,
    bitcoin_datadir: Path | None = None,
    bitcoin_conf: Path | None = None,
    regtest_dirs: Sequence[Path] = (),
) -> NodeEndpoint:
    """The node as the command line finds it: the given RPC user (or URL and cookie); else, on
    regtest, a background node of ``btcchannel regtest start`` recorded in one of ``regtest_dirs``;
    else ``network``'s node found as bitcoin-cli finds it (port and cookie from the network,
    ``bitcoin_datadir`` and ``bitcoin_conf``). ``NodeUnavailable`` saying what was tried."""
    access = derive_node_access(network, bitcoin_datadir, bitcoin_conf, rpc_url)
    if rpc_user is not None:
        return NodeEndpoint(access.url, rpc_user, rpc_password or "", None, "--rpc-user")
    if rpc_url or rpc_cookie:
        if access.user is not None and rpc_cookie is None:
            return NodeEndpoint(access.url, access.user, access.password or "", None, "rpcpassword of bitcoin.conf")
        return NodeEndpoint(
            access.url,
            None,
            None,
            rpc_cookie or access.cookie,
            "--rpc-cookie" if rpc_cookie else "the network's cookie",
        )
    if network == "regtest" and bitcoin_datadir is None and bitcoin_conf is None:
        for folder in regtest_dirs:
            rec = recorded_rpc(folder)
            if rec is not None:
                url, user, password = rec
                return NodeEndpoint(url, user, password, None, f"`btcchannel regtest start` node in {folder}")
    if access.user is not None:
        return NodeEndpoint(access.url, access.user, access.password or "", None, "rpcpassword of bitcoin.conf")
    if access.cookie is not None and access.cookie.exists():
        return NodeEndpoint(access.url, None, None, access.cookie, "the network's cookie")
    start = " or run `btcchannel regtest start`" if network == "regtest" else ""
    raise NodeUnavailable(
        f"no {network} node found: no cookie at {access.cookie} and no rpcpassword in "
        f"bitcoin.conf; pass --bitcoin-datadir, --rpc-url with --rpc-cookie or "
        f"--rpc-user/--rpc-password{start}"
    )


def check_rpc_url(url: str) -> tuple[str, int]:
    """The host and port of the node's RPC ``url``; ``NodeUnavailable`` saying how to write it
    when it is not an http(s) URL with a host and a valid port."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NodeUnavailable(
            f"--rpc-url {url!r} is not a URL: give it as http://HOST:PORT, e.g. http://127.0.0.1:18443"
        )
    try:
        return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise NodeUnavailable(f"--rpc-url {url!r} has a bad port: {e}") from e


def check_reachable(url: str, timeout: float = 3.0) -> None:
    """``NodeUnavailable`` naming ``url`` when nothing accepts a connection there."""
    host, port = check_rpc_url(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise NodeUnavailable(f"no node answers at {url}: {why}") from e


def node_client(ep: NodeEndpoint, wallet: str | None = None) -> Node:
    """A client of the node at ``ep``; a node that does not answer at all (no cookie to read yet)
    is reported as unreachable, not as a missing cookie."""
    check_rpc_url(ep.url)
    if ep.user is not None:
        return Node(ep.url, auth=(ep.user, ep.password or ""), wallet=wallet)
    if ep.cookie is None or not ep.cookie.exists():
        check_reachable(ep.url)
    return Node(ep.url, cookie_file=ep.cookie, wallet=wallet)


def find_node(
    network: str = "regtest",
    *,
    wallet: str | None = None,
    rpc_url: str | None = None,
    rpc_cookie: Path | None = None,
    rpc_user: str | None = None,
    rpc_password: str | None = None,
    bitcoin_datadir: Path | None = None,
    bitcoin_conf: Path | None = None,
    regtest_dirs: Sequence[Path] = (),
) -> Node:
    """A client (of ``wallet``) of the node :func:`locate_node` finds."""
    ep = locate_node(
        network,
        rpc_url=rpc_url,
        rpc_cookie=rpc_cookie,
        rpc_user=rpc_user,
        rpc_password=rpc_password,
        bitcoin_datadir=bitcoin_datadir,
        bitcoin_conf=bitcoin_conf,
        regtest_dirs=regtest_dirs,
    )
    return node_client(ep, wallet)
