"""Shared set-up of the service tests.

The fixtures come from btcchannel's pytest plugin (:mod:`btcchannel.testing.plugin`):
``bitcoind``, ``funded_wallet``, ``payee_factory``, ``payer_factory``, ``payer_client``, ...;
helpers from :mod:`btcchannel.testing`. Here: ``payee``, a payee service with the default
fast test configuration in ``<tmp_path>/payee``.
"""

from __future__ import annotations

import pytest_asyncio

from btcchannel.testing import RunningPayee
from btcchannel.testing.fixtures import PayeeFactory


@pytest_asyncio.fixture
async def payee(payee_factory: PayeeFactory) -> RunningPayee:
    """A running payee service (``fast_config(tmp_path / "payee")``), stopped at teardown."""
    return await payee_factory.start()
