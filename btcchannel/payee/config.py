"""The payee's configuration: :class:`ServerConfig` (every field a service, closer and watcher read)."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from btcchannel.core import script
from btcchannel.core.terms import Metering, ProposalLimits, Terms, deadline_blocks
from btcchannel.errors import ChannelError
from btcchannel.store import is_postgres_url
from btcchannel.wire import MAX_BODY

__all__ = ["MIN_CLOSE_MARGIN_BLOCKS", "ServerConfig"]


def _client_key(address: str | None) -> str | None:
    """IPv6 addresses come by the /64 to one host: a client is its /64 (loopback stays itself)."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#: The close is sent ``close_margin_blocks`` before expiry and can be replaced from the next block
#: on; the payer's refund is valid from expiry: below 2 blocks a stuck close never gets a bump.
MIN_CLOSE_MARGIN_BLOCKS = 2

#: on a public network, a best block older than this means the node's view is not current
DEFAULT_MAX_BLOCK_AGE_S = 2 * 3600.0


@dataclass
class ServerConfig:
    """Everything the payee's service is configured with (amounts in satoshis)."""

    datadir: Path
    network: str = "regtest"
    host: str = "127.0.0.1"
    port: int = 0
    payee_address: str | None = None  # where closes pay; None: a fresh node-wallet address
    min_deposit_sat: int = 10_000
    max_deposit_sat: int = 100_000_000
    min_lifetime_blocks: int = 12
    max_lifetime_blocks: int = 4320
    close_margin_blocks: int = 6  # close this many blocks before expiry (at least 2)
    min_confirmations: int = 1  # depth at which a funding opens the channel (>= 1)
    final_confirmations: int = 6  # depth at which a close or a conflict is final
    proposal_ttl_s: float = 600.0  # an unfunded proposal lapses after this
    max_proposals: int = 100  # cap on unfunded proposals (too_many_channels)
    max_proposals_per_client: int = 10  # the same cap per client address
    proposal_cooldown_s: float = 600.0  # a lapsed or cancelled proposal counts against its client's cap this long
    proposal_grace_s: float = 10.0  # with the total cap full, the oldest proposal of the client holding
    # the most, unfunded after this long, gives way to a client with fewer
    trusted_proxies: tuple[str, ...] = ()  # addresses/networks of reverse proxies whose X-Forwarded-For is believed
    retention_s: float = 7 * 86400.0  # failed rows without payments are deleted after this
    close_fee_rate_sat_vb: float | None = None  # None: the node's estimate
    fee_conf_target: int = 6
    fallback_fee_rate_sat_vb: float = 2.0
    bump_after_blocks: int = 3  # RBF-bump a close unconfirmed after this many blocks
    bump_factor: float = 2.0
    max_fee_rate_sat_vb: float = 1000.0
    poll_interval_s: float = 1.0  # watcher period (and the tip follower's)
    max_tip_age_s: float = 10.0  # payments refused when the node's tip is older than this
    max_block_age_s: float | None = None  # ... or when its best block is older than this (None: per network)
    price_sat: int = 0  # metered service: price per unit (0: none)
    mode: str = "prepay"  # "prepay" or "postpay"
    credit_limit_sat: int = 0  # postpay: unpaid total allowed (per channel)
    credit_cap_per_payer_sat: int | None = None  # postpay: unpaid total across one payer key's channels
    credit_cap_per_client_sat: int | None = None  # ... across one client address's channels
    credit_cap_total_sat: int | None = None  # ... across all channels (None: no cap)
    allow_plain_http: bool = False  # paid routes over plain HTTP from non-loopback clients
    payment_timeout_s: float = 30.0  # postpay: time to pay what is owed
    idle_timeout_s: float | None = None  # prepay: close an open channel without a payment this long
    max_body_bytes: int = MAX_BODY
    body_timeout_s: float = 10.0  # a request body must arrive whole within this (else 400, connection closed)
    header_timeout_s: float = 15.0  # a connection must complete a request's headers within this of opening
    # (or of its last answer), else it is closed
    max_header_bytes: int = 8190  # longest request line and header field
    max_headers: int = 64  # most header fields in a request
    store_url: str | None = None  # postgresql://... shared by several instances; None: <datadir>/payee.db
    public_url: str | None = None  # where payers reach the protocol endpoints (the 402's URLs), e.g.
    # https://api.example/btc; None: the request's Host (see origin_policy)
    trust_host_header: bool = False  # build the 402's URLs from the Host header even on a public address
    metrics_host: str = "127.0.0.1"  # the separate /metrics listener (see payee.metrics)
    metrics_port: int = 0  # (0: a free port, recorded in server.json)
    metrics_public: bool = False  # serve /metrics on the payee's own port instead (anyone can read it)

    @property
    def block_age_bound_s(self) -> float | None:
        """How old the node's best block may be before its view counts as stale: the configured
        bound, else two hours on a public network (a node cut off from its peers still answers,
        with an old tip) and none on regtest, where blocks come only when someone mines."""
        if self.max_block_age_s is not None:
            return self.max_block_age_s
        return None if self.network == "regtest" else DEFAULT_MAX_BLOCK_AGE_S

    def __post_init__(self) -> None:
        self.datadir = Path(self.datadir)
        script.check_network(self.network)
        self._check_chain_schedule()
        self._check_node_freshness()
        self._check_http_limits()
        self._check_credit_caps()
        self._check_public_url()
        if self.store_url is not None and not is_postgres_url(self.store_url):
            raise ValueError("store_url must be a postgresql:// URL (leave it unset for SQLite)")
        try:
            self.terms  # noqa: B018 - the core validates the terms
            self.proposal_limits  # noqa: B018
        except ChannelError as err:
            raise ValueError(err.message) from None

    def _check_chain_schedule(self) -> None:
        """The depths a funding opens and a close ends at, and the close's schedule before expiry."""
        if self.min_confirmations < 1:
            raise ValueError("min_confirmations must be at least 1 (an unconfirmed funding can vanish)")
        if self.final_confirmations < 1:
            raise ValueError("final_confirmations must be at least 1")
        if self.close_margin_blocks < MIN_CLOSE_MARGIN_BLOCKS:
            raise ValueError(
                f"close_margin_blocks={self.close_margin_blocks} leaves no block in which a stuck close can be "
                f"fee-bumped before the payer's refund is valid (the close is sent close_margin_blocks blocks "
                f"before expiry and replaced at the earliest one block later): use at least {MIN_CLOSE_MARGIN_BLOCKS}"
            )
        if self.bump_after_blocks < 1:
            raise ValueError("bump_after_blocks must be at least 1")

    def _check_node_freshness(self) -> None:
        """How often the node is asked, and how old its tip and best block may be."""
        if not 0 < self.poll_interval_s < self.max_tip_age_s:
            raise ValueError("max_tip_age_s must be more than poll_interval_s (and both positive)")
        if self.max_block_age_s is not None and self.max_block_age_s <= 0:
            raise ValueError("max_block_age_s must be positive")

    def _check_http_limits(self) -> None:
        """The HTTP listener's trusted proxies (normalised to networks), timeouts and header limits."""
        try:
            self.trusted_proxies = tuple(str(ipaddress.ip_network(p, strict=False)) for p in self.trusted_proxies)
        except ValueError as e:
            raise ValueError(f"trusted_proxies: {e}") from None
        if self.body_timeout_s <= 0 or self.header_timeout_s <= 0:
            raise ValueError("body_timeout_s and header_timeout_s must be positive")
        if self.max_header_bytes < 256 or self.max_headers < 8:
            raise ValueError("max_header_bytes must be at least 256 and max_headers at least 8")

    def _check_credit_caps(self) -> None:
        """Postpay's caps on outstanding credit across channels: none negative."""
        for cap in ("credit_cap_per_payer_sat", "credit_cap_per_client_sat", "credit_cap_total_sat"):
            value = getattr(self, cap)
            if value is not None and value < 0:
                raise ValueError(f"{cap} must not be negative")

    def _check_public_url(self) -> None:
        """Where payers reach the protocol: ``public_url`` is an absolute http(s) URL, and a payee selling
        metered requests on a public address names it (or trusts the Host header)."""
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"public_url must be an absolute http(s) URL without query, not {self.public_url!r}")
        if self.price_sat > 0 and not self.host_header_allowed:
            raise ValueError(
                f"the payee listens on {self.host} on {self.network} and sells metered requests: set public_url "
                "(the URL payers reach it at; the 402's URLs are built from it), or trust_host_header if a "
                "proxy in front sets the Host header"
            )

    @property
    def host_header_allowed(self) -> bool:
        """Whether the 402's URLs may be built from a request's ``Host`` header (when no ``public_url``
        is set): on regtest, on a loopback address, or when the operator says so
        (``trust_host_header``). On a public address a client could otherwise point other payers
        (through a cache) at any host it names."""
        return (
            self.public_url is not None
            or self.trust_host_header
            or self.network == "regtest"
            or _is_loopback(self.host)
        )

    def is_trusted_proxy(self, address: str) -> bool:
        """Whether ``address`` is one of the configured reverse proxies (``trusted_proxies``)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net) for net in self.trusted_proxies)

    def client_address(self, peer: str | None, forwarded_for: list[str]) -> str | None:
        """The client a request comes from, for the per-client caps: the peer's address, unless the
        peer is a trusted proxy; then the nearest address of ``X-Forwarded-For`` (read from the
        right) that is not itself a trusted proxy. A client cannot forge it: hops added before the
        first untrusted one are never read. An IPv6 client is its /64 (one host's usual share)."""
        return _client_key(self._client_ip(peer, forwarded_for))

    def _client_ip(self, peer: str | None, forwarded_for: list[str]) -> str | None:
        if peer is None or not self.is_trusted_proxy(peer):
            return peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",")]
        for hop in reversed(hops):
            try:
                addr = str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a malformed entry: the proxy's own address, not a guess
            if not self.is_trusted_proxy(addr):
                return addr
        return peer

    def warnings(self) -> list[str]:
        """What is valid but probably unintended in this configuration (the service logs each at start)."""
        found = []
        if self.bump_after_blocks >= self.close_margin_blocks:
            found.append(
                f"bump_after_blocks={self.bump_after_blocks} >= close_margin_blocks={self.close_margin_blocks}: "
                f"a stuck close is bumped automatically only in the last {self.urgent_blocks} block(s) before "
                f"expiry (the deadline schedule), never periodically before that"
            )
        return found

    @property
    def urgent_blocks(self) -> int:
        """In this many last blocks before expiry an unconfirmed close is bumped every block to
        ``max_fee_rate_sat_vb`` (or what the payment affords): half the close margin, at least 1."""
        return deadline_blocks(self.close_margin_blocks)

    @property
    def metering(self) -> Metering:
        """The metered service's terms, as the core's rules."""
        return Metering(self.price_sat, self.mode, self.credit_limit_sat)

    @property
    def terms(self) -> Terms:
        """The terms this payee requires of new channels (no end conditions: the payer proposes those)."""
        idle = None if self.idle_timeout_s is None else max(1, round(self.idle_timeout_s * 1000))
        return Terms(
            self.price_sat, self.mode, self.credit_limit_sat, max(1, round(self.payment_timeout_s * 1000)), idle
        )

    @property
    def proposal_limits(self) -> ProposalLimits:
        """The accepted deposit range and channel lifetime, as the core's rules."""
        return ProposalLimits(
            self.min_deposit_sat, self.max_deposit_sat, self.min_lifetime_blocks, self.max_lifetime_blocks
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the fields."""
        d = asdict(self)
        d["datadir"] = str(self.datadir)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ServerConfig:
        """Inverse of ``to_json`` (unknown keys are an error)."""
        names = {f.name for f in fields(cls)}
        bad = set(d) - names
        if bad:
            raise ValueError(f"unknown config fields {sorted(bad)}")
        return cls(**d)

    @property
    def store_target(self) -> str | Path:
        """Where the payee's store is: ``store_url`` if set, else :attr:`db_path`."""
        return self.store_url if self.store_url else self.db_path

    @property
    def db_path(self) -> Path:
        """The payee's SQLite database: ``<datadir>/payee.db``."""
        return self.datadir / "payee.db"
