"""The payee's close margin and bump interval, checked against each other at start: a margin that
leaves no block to bump a stuck close before the payer's refund is valid is refused with a clear
message (config, CLI); a bump interval that never fires before the deadline schedule is a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from btcchannel.cli import main
from btcchannel.payee.config import MIN_CLOSE_MARGIN_BLOCKS, ServerConfig
from btcchannel.testing.fixtures import PayeeFactory


@pytest.mark.parametrize("margin", [-1, 0, 1])
def test_a_margin_without_a_bump_before_expiry_is_refused(tmp_path: Path, margin: int) -> None:
    with pytest.raises(ValueError, match=rf"close_margin_blocks={margin} leaves no block .* use at least 2"):
        ServerConfig(datadir=tmp_path, close_margin_blocks=margin)


def test_the_smallest_margin_leaves_one_deadline_bump(tmp_path: Path) -> None:
    config = ServerConfig(datadir=tmp_path, close_margin_blocks=MIN_CLOSE_MARGIN_BLOCKS, bump_after_blocks=1)
    # the close is sent at expiry - 2; at expiry - 1 it is in the urgent window, where it is bumped
    assert config.urgent_blocks == 1
    assert config.warnings() == []


def test_a_bump_interval_of_zero_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bump_after_blocks must be at least 1"):
        ServerConfig(datadir=tmp_path, bump_after_blocks=0)


def test_periodic_bumps_past_the_margin_are_a_warning(tmp_path: Path) -> None:
    assert ServerConfig(datadir=tmp_path).warnings() == []  # defaults: margin 6, a bump every 3 blocks
    assert ServerConfig(datadir=tmp_path, close_margin_blocks=6, bump_after_blocks=5).warnings() == []
    for bump in (6, 1000):  # 1000: periodic bumps switched off, still a valid configuration
        (warning,) = ServerConfig(datadir=tmp_path, close_margin_blocks=6, bump_after_blocks=bump).warnings()
        assert f"bump_after_blocks={bump} >= close_margin_blocks=6" in warning
        assert "only in the last 3 block(s) before expiry" in warning


def test_the_cli_refuses_a_one_block_margin(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["--datadir", str(tmp_path), "serve", "--close-margin-blocks", "1"])
    assert out.exit_code == 2, out.output
    assert "close_margin_blocks=1 leaves no block" in out.output
    assert not (tmp_path / "payee.db").exists()


async def test_the_service_logs_the_warning_at_start(
    payee_factory: PayeeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="btcchannel.payee.http"):
        await payee_factory.start(close_margin_blocks=4, bump_after_blocks=1000)
    warnings = [r.getMessage() for r in caplog.records if r.name == "btcchannel.payee.http"]
    assert any("bump_after_blocks=1000 >= close_margin_blocks=4" in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="btcchannel.payee.http"):
        await payee_factory.start(payee_factory.config("quiet", close_margin_blocks=4, bump_after_blocks=2))
    assert not [r for r in caplog.records if "bump_after_blocks" in r.getMessage()]
