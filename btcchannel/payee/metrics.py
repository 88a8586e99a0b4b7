"""The payee's Prometheus metrics at ``GET /metrics`` (``prometheus_client``, one registry per app).

They tell revenue, deposits and channel counts, so they are not served to the public: by default
``/metrics`` is on a listener of its own at ``metrics_host:metrics_port`` of the
:class:`~btcchannel.payee.config.ServerConfig` (``127.0.0.1``, a free port unless set; its URL
is :attr:`MetricsEndpoint.url` once the app runs, and in ``server.json``). ``metrics_public``
serves it on the payee's own port instead.

Counted as requests pass (an aiohttp middleware): requests by route and status, their
latency (histogram by route), acknowledged payments (``kind``: ``channel`` for the payments
endpoint, ``metered`` for a paid request that carried its payment). Read from the store at each scrape
(one aggregate query): channels, paid and deposited satoshis by state, the chain tip the
service last saw and the node's staleness (seconds since it last answered, a problem flag). Read
from the closer: the closes it sent again because the node had lost them (a restart without its
mempool, an invalidated block) and the closes it found pinned by descendants (a replacement then
pays for them too). Routes are labelled by their pattern (``/v1/channels/{cid}/payments``),
so the label set stays bounded whatever the requests.

Entry point::

    install_metrics(app: web.Application) -> MetricsEndpoint   # before the app starts
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from btcchannel.payee.appkeys import CLIENT_ERRORS, SERVICE
from btcchannel.payee.clientlog import ClientErrorLog
from btcchannel.payee.closer import Closer
from btcchannel.payee.shared import ChainTip
from btcchannel.store import PayeeStore
from btcchannel.store.ops import state_totals
from btcchannel.wire import HDR_AMOUNT

__all__ = ["METRICS", "MetricsEndpoint", "install_metrics"]

log = logging.getLogger("btcchannel.payee.metrics")


@dataclass
class MetricsEndpoint:
    """Where the app's metrics are read: ``url`` (None until the listener runs) and the registry."""

    registry: CollectorRegistry
    url: str | None = None


METRICS: web.AppKey[MetricsEndpoint] = web.AppKey("btcchannel_metrics", MetricsEndpoint)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _StoreCollector(Collector):
    """Channels and satoshis by state, and the chain tip, read at each scrape."""

    def __init__(self, store: PayeeStore, tip: ChainTip) -> None:
        self.store = store
        self.tip = tip

    def collect(self) -> Iterator[GaugeMetricFamily]:
        totals = state_totals(self.store)
        channels = GaugeMetricFamily("btcchannel_channels", "Channels by state.", labels=["state"])
        paid = GaugeMetricFamily(
            "btcchannel_paid_sat", "Best payment summed over the channels of a state, sat.", labels=["state"]
        )
        deposit = GaugeMetricFamily(
            "btcchannel_deposit_sat", "Deposits summed over the channels of a state, sat.", labels=["state"]
        )
        for state, t in sorted(totals.items()):
            channels.add_metric([state], t.channels)
            paid.add_metric([state], t.amount_sat)
            deposit.add_metric([state], t.deposit_sat)
        yield channels
        yield paid
        yield deposit
        yield GaugeMetricFamily(
            "btcchannel_chain_tip_height", "The chain height the service last saw.", value=self.tip.height
        )
        age = self.tip.age_s()
        yield GaugeMetricFamily(
            "btcchannel_node_tip_age_seconds",
            "Seconds since the node last answered a tip query (-1: never).",
            value=-1.0 if age is None else age,
        )
        yield GaugeMetricFamily(
            "btcchannel_node_problem",
            "1 while the node's view cannot be trusted (initial block download, wrong chain).",
            value=0.0 if self.tip.problem is None else 1.0,
        )


class _ClientErrors(Collector):
    """What clients did wrong (malformed requests, bodies cut short or too slow), by kind."""

    def __init__(self, errors: ClientErrorLog) -> None:
        self.errors = errors

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "btcchannel_client_errors",
            "Requests a client got wrong, by kind (answered 400 or dropped; logged at INFO at most once a minute).",
            labels=["kind"],
        )
        for kind, n in sorted(self.errors.kinds.items()):
            family.add_metric([kind], n)
        yield family


class _CloserCollector(Collector):
    """What the closer did that the chain alone does not show, read at each scrape."""

    def __init__(self, closer: Closer) -> None:
        self.closer = closer

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = self.closer.events
        yield CounterMetricFamily(
            "btcchannel_close_rebroadcasts",
            "Recorded closes the node no longer had (restarted without its mempool, "
            "evicted, their block invalidated), sent again by the payee.",
            value=events["rebroadcast"],
        )
        yield CounterMetricFamily(
            "btcchannel_close_pinned",
            "Replacements of a close that had to outbid descendants hung on it.",
            value=events["pinned"],
        )


def install_metrics(app: web.Application) -> MetricsEndpoint:
    """Add the counting middleware to the payee's ``app`` (not started yet) and ``GET /metrics`` on
    the metrics listener (or, with ``metrics_public``, on the app itself)."""
    registry = CollectorRegistry()
    requests = Counter(
        "btcchannel_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=registry
    )
    latency = Histogram(
        "btcchannel_http_request_seconds",
        "HTTP request latency by route.",
        ["route"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
    )
    payments = Counter(
        "btcchannel_payments",
        "Payments acknowledged: POST .../payments answered 200 (kind "
        "channel), or a paid request carrying a payment answered below 400 (kind metered).",
        ["kind"],
        registry=registry,
    )
    svc = app[SERVICE]
    registry.register(_StoreCollector(svc.store, svc.tip))
    if CLIENT_ERRORS in app:
        registry.register(_ClientErrors(app[CLIENT_ERRORS]))
    registry.register(_CloserCollector(svc.closer))

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        start = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            latency.labels(route).observe(time.perf_counter() - start)
            requests.labels(route, str(status)).inc()
            if status == 200 and request.method == "POST" and route.endswith("/payments"):
                payments.labels("channel").inc()
            elif status < 400 and HDR_AMOUNT in request.headers:
                payments.labels("metered").inc()

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.middlewares.insert(0, count)  # outermost: it sees the status the error middleware answers with
    endpoint = app[METRICS] = MetricsEndpoint(registry)
    cfg = svc.config
    if cfg.metrics_public:
        app.router.add_get("/metrics", metrics)
        return endpoint

    async def listener(app: web.Application) -> AsyncIterator[None]:
        own = web.Application()
        own.router.add_get("/metrics", metrics)
        runner = web.AppRunner(own, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, cfg.metrics_host, cfg.metrics_port).start()
            host, port = runner.addresses[0][:2]
            endpoint.url = f"http://{host}:{port}/metrics"
            log.info("metrics on %s", endpoint.url)
            yield
        finally:
            await runner.cleanup()

    app.cleanup_ctx.append(listener)
    return endpoint
