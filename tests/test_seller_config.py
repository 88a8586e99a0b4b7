"""PaidService reads its settings as the command line does (no node is called here): arguments, then
BTCCHANNEL_* variables, then the --config file's [global] and [serve] tables, then the defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from btcchannel.bitcoind.rpc import Node
from btcchannel.payee.seller import PaidService, read_config_file


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "btcchannel.toml"
    path.write_text(
        f'[global]\nnetwork = "signet"\ndatadir = "{tmp_path / "state"}"\nwallet = "shop"\n'
        f'[serve]\nprice-sat = 2\nmode = "postpay"\ncredit-limit-sat = 40\nport = 8402\n{extra}'
    )
    return path


def test_the_config_files_tables(tmp_path: Path) -> None:
    node, fields = read_config_file(_config(tmp_path))
    assert node == {"network": "signet", "datadir": str(tmp_path / "state"), "wallet": "shop"}
    assert fields == {"price_sat": 2, "mode": "postpay", "credit_limit_sat": 40}  # port: the seller's own app's
    with pytest.raises(ValueError, match="pricesat"):
        read_config_file(_config(tmp_path, "pricesat = 3\n"))
    with pytest.raises(ValueError, match="cannot read"):
        read_config_file(tmp_path / "missing.toml")


def test_paid_service_settings_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = Node("http://127.0.0.1:1", auth=("u", "p"))  # never called: nothing is started
    monkeypatch.delenv("BTCCHANNEL_NETWORK", raising=False)
    monkeypatch.setenv("BTCCHANNEL_DATADIR", str(tmp_path / "env"))
    service = PaidService(config=_config(tmp_path, 'public-url = "https://shop.example/btc"\n'), node=node)
    try:
        assert service.config.network == "signet" and service.config.public_url == "https://shop.example/btc"
        assert service.config.datadir == tmp_path / "env" / "signet"  # the variable wins over the file
        assert (service.config.price_sat, service.config.mode, service.config.credit_limit_sat) == (2, "postpay", 40)
        assert service.config.db_path.exists()
    finally:
        service.store.close()
    service = PaidService(
        config=_config(tmp_path), node=node, network="regtest", datadir=tmp_path / "arg", price_sat=5
    )  # arguments win over both
    try:
        assert (service.config.network, service.config.datadir, service.config.price_sat) == (
            "regtest",
            tmp_path / "arg" / "regtest",
            5,
        )
    finally:
        service.store.close()
