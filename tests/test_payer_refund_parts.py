"""The refund is a part the payer's client holds, not a mixin (no node: a stub answers the one
call a never-funded channel makes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from btcchannel.core import keys
from btcchannel.core.params import ChannelParams
from btcchannel.core.state import ChannelState
from btcchannel.errors import NotOpen, UnknownChannel
from btcchannel.payer.client import PayerClient
from btcchannel.payer.refund import Refunds
from btcchannel.store import PayerRecord, PayerStore

CID = "ef" * 16


class _EmptyChain:
    """``scantxoutset`` finds nothing: the deposit was never sent."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def call(self, method: str, *args: Any) -> dict[str, Any]:
        self.calls.append(method)
        return {"unspents": []}


def _store(path: Path) -> PayerStore:
    privkey = keys.generate_private_key()
    params = ChannelParams(
        network="regtest",
        payer_pubkey=keys.public_key(privkey),
        payee_pubkey=keys.public_key(keys.generate_private_key()),
        expiry_height=500,
        deposit_sat=100_000,
        payer_script=b"\x00\x14" + bytes(20),
    )
    store = PayerStore(path)
    store.insert(
        PayerRecord(
            channel_id=CID,
            server_url="http://127.0.0.1:1",
            state=ChannelState.PROPOSED,
            params=params.to_json(),
            privkey=privkey,
            deposit_sat=100_000,
            expiry_height=500,
        )
    )
    return store


async def test_the_client_holds_its_refunds(tmp_path: Path) -> None:
    assert not issubclass(PayerClient, Refunds)
    node = _EmptyChain()
    client = PayerClient(tmp_path, node, network="regtest")  # type: ignore[arg-type]
    try:
        assert isinstance(client.refunds, Refunds)
        assert client.refunds.store is client.store and client.refunds.node is node
        other = _store(tmp_path / "other.db")
        client.store.insert(other.get(CID))
        other.close()
        with pytest.raises(NotOpen, match="never funded"):
            await client.refund(CID)
        assert node.calls == ["scantxoutset"]
    finally:
        await client.aclose()


async def test_refunds_ask_the_record_they_are_given(tmp_path: Path) -> None:
    """The channel comes from the ``record`` the holder gives (the client's refuses another network's)."""
    store = _store(tmp_path / "payer.db")
    asked: list[str] = []

    def refuse(channel_id: str) -> PayerRecord:
        asked.append(channel_id)
        raise UnknownChannel(f"channel {channel_id} is a signet channel")

    node = _EmptyChain()
    try:
        with pytest.raises(UnknownChannel, match="signet"):
            await Refunds(store, node, "regtest", refuse).refund_details(CID)  # type: ignore[arg-type]
        assert asked == [CID] and node.calls == []
        with pytest.raises(NotOpen, match="never funded"):
            await Refunds(store, node, "regtest", store.get).refund_details(CID)  # type: ignore[arg-type]
    finally:
        store.close()
