"""The payee's paid-request path: an open channel's row is kept in memory (no read per paid request),
and a row kept while another writer (another instance on the same store) moved the channel on is never
the ground for a decision that cannot be undone: a lost compare-and-set or a wrong amount is decided
again on the stored row."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from btcchannel.bitcoind.regtest import RegtestNode
from btcchannel.payee.metered import add_file_route
from btcchannel.payer.client import PayerClient
from btcchannel.payer.metered import MeteredPayer
from btcchannel.store import PayeeStore
from btcchannel.testing import open_channel
from btcchannel.testing.fixtures import PayeeFactory

PRICE = 100
CHUNK = 100


def _file(tmp_path: Path) -> Path:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(CHUNK * 10))
    return data


async def test_a_paid_request_reads_no_row(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(payer_client, cid)
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/0"))[0] == 200
        reads: list[str] = []
        row = srv.store._row  # noqa: SLF001

        def counted(channel_id: str) -> Any:
            reads.append(channel_id)
            return row(channel_id)

        srv.store._row = counted  # type: ignore[method-assign]  # noqa: SLF001
        for i in range(1, 6):
            assert (await payer.fetch(f"{srv.url}/v1/file/{i}"))[0] == 200
        srv.store._row = row  # type: ignore[method-assign]  # noqa: SLF001
    finally:
        await payer.aclose()
    assert cid not in reads
    rec = srv.store.get(cid)
    assert (rec.units, rec.amount_sat) == (6, 6 * PRICE)


async def test_a_row_changed_by_another_instance_is_decided_again(
    bitcoind: RegtestNode,
    tmp_path: Path,
    payee_factory: PayeeFactory,
    payer_client: PayerClient,
) -> None:
    data = _file(tmp_path)
    srv = await payee_factory.start(
        hook=lambda app: add_file_route(app, data, chunk_size=CHUNK), price_sat=PRICE, mode="prepay"
    )
    cid = await open_channel(payer_client, bitcoind, srv.url, 100_000)
    payer = MeteredPayer(payer_client, cid)
    try:
        assert (await payer.fetch(f"{srv.url}/v1/file/0"))[0] == 200  # the serving instance keeps this row
        # another instance on the same store serves the next unit (the payer's signed payment for it)
        payment = await payer_client.sign_next(cid, 2 * PRICE, units_ahead=1)
        other = PayeeStore(srv.store.path)
        try:
            assert (
                other.record_payment(
                    cid,
                    payment.amount_sat,
                    payment.signature,
                    units_delta=1,
                    request_counter=payer_client.store.next_request_counter(cid, 0),
                )
                is not None
            )
        finally:
            other.close()
        payer_client.store.add_units(cid, 1, payment.amount_sat)
        # the next payment is exactly right for the stored row, wrong for the kept one: it is charged,
        # and the channel is not ended for a wrong amount
        for i in (2, 3):
            status, body = await payer.fetch(f"{srv.url}/v1/file/{i}")
            assert status == 200 and body == data.read_bytes()[i * CHUNK : (i + 1) * CHUNK]
    finally:
        await payer.aclose()
    rec = srv.store.get(cid)
    assert (rec.state, rec.units, rec.amount_sat) == ("open", 4, 4 * PRICE)
