"""Finding the node as ``bitcoin-cli`` does: the network's RPC port, cookie and ``bitcoin.conf``.

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
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_RPC_PORT", "NodeAccess", "bitcoin_default_datadir", "derive_node_access", "read_bitcoin_conf"]

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
