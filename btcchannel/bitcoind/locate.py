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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from btcchannel.bitcoind.regtest import recorded_rpc
from btcchannel.bitcoind.rpc import Node
from btcchannel.errors import NodeUnavailable

__all__ = ["DEFAULT_RPC_PORT", "NodeAccess", "bitcoin_default_datadir", "default_datadir", "derive_node_access",
           "find_node", "read_bitcoin_conf"]

DEFAULT_RPC_PORT: dict[str, int] = {
    "mainnet": 8332, "testnet": 18332, "testnet4": 48332, "signet": 38332, "regtest": 18443,
}
NETWORK_SUBDIR: dict[str, str] = {
    "mainnet": "", "testnet": "testnet3", "testnet4": "testnet4", "signet": "signet", "regtest": "regtest",
}
CONF_SECTION: dict[str, str] = {
    "mainnet": "main", "testnet": "test", "testnet4": "testnet4", "signet": "signet", "regtest": "regtest",
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


def derive_node_access(network: str, bitcoin_datadir: Path | None, bitcoin_conf: Path | None,
                       rpc_url: str | None = None) -> NodeAccess:
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
        conf.get("rpcconnect", "127.0.0.1"), conf.get("rpcport", DEFAULT_RPC_PORT[network]))
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


def find_node(network: str = "regtest", *, wallet: str | None = None, rpc_url: str | None = None,
              rpc_cookie: Path | None = None, rpc_user: str | None = None, rpc_password: str | None = None,
              bitcoin_datadir: Path | None = None, bitcoin_conf: Path | None = None,
              regtest_dirs: Sequence[Path] = ()) -> Node:
    """The node as the command line finds it: the given RPC user (or URL and cookie); else, on
    regtest, a background node of ``btcchannel regtest start`` recorded in one of ``regtest_dirs``;
    else ``network``'s node found as bitcoin-cli finds it (port and cookie from the network,
    ``bitcoin_datadir`` and ``bitcoin_conf``). ``NodeUnavailable`` saying what was tried."""
    access = derive_node_access(network, bitcoin_datadir, bitcoin_conf, rpc_url)
    if rpc_user is not None:
        return Node(access.url, auth=(rpc_user, rpc_password or ""), wallet=wallet)
    if rpc_url or rpc_cookie:
        if access.user is not None and rpc_cookie is None:
            return Node(access.url, auth=(access.user, access.password or ""), wallet=wallet)
        return Node(access.url, cookie_file=rpc_cookie or access.cookie, wallet=wallet)
    if network == "regtest" and bitcoin_datadir is None and bitcoin_conf is None:
        for folder in regtest_dirs:
            rec = recorded_rpc(folder)
            if rec is not None:
                url, user, password = rec
                return Node(url, auth=(user, password), wallet=wallet)
    if access.user is not None:
        return Node(access.url, auth=(access.user, access.password or ""), wallet=wallet)
    if access.cookie is not None and access.cookie.exists():
        return Node(access.url, cookie_file=access.cookie, wallet=wallet)
    start = " or run `btcchannel regtest start`" if network == "regtest" else ""
    raise NodeUnavailable(f"no {network} node found: no cookie at {access.cookie} and no rpcpassword in "
                          f"bitcoin.conf; pass --bitcoin-datadir, --rpc-url with --rpc-cookie or "
                          f"--rpc-user/--rpc-password{start}")
