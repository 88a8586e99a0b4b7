"""The regtest demo, run as a user runs it: a real subprocess with its own bitcoind.

Checks the exit status, the exact form of the summary line and its invariants
(two on-chain transactions; deposit = payee + payer change + close fee; paid =
payee + close fee = payments x price), and, for ``--scenario all``, the outcome
line of every side story.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "regtest" / "demo.py"
SUMMARY = re.compile(
    r"^payments=(?P<payments>\d+) units=(?P<units>\d+) onchain_transactions=(?P<M>\d+) channel_vbytes=(?P<V>\d+) "
    r"paid_sat=(?P<S>\d+) payee_received_sat=(?P<R>\d+) payer_change_sat=(?P<C>\d+) close_fee_sat=(?P<F>\d+)$"
)
TERMS = re.compile(r"^deposit_sat=(?P<deposit>\d+) price_sat=(?P<price>\d+) ", re.M)
SCENARIO = re.compile(
    r"^scenario=(?P<name>[a-z-]+) outcome=(?P<outcome>\w+) deposit_sat=(?P<deposit>\d+) paid_sat=(?P<paid>\d+) "
    r"payee_received_sat=(?P<R>\d+) payer_change_sat=(?P<C>\d+) fee_sat=(?P<F>\d+) onchain_transactions=(?P<M>\d+)$",
    re.M,
)


def run_demo(*args: str, timeout: float = 80.0) -> str:
    proc = subprocess.run(
        [sys.executable, str(DEMO), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"demo exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_summary(stdout: str, units: int, payments: int | None = None) -> None:
    """The summary line: ``units`` chunks bought with ``payments`` signed payments (default: one each)."""
    last = stdout.rstrip("\n").splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, f"unexpected last line: {last!r}"
    f = {k: int(v) for k, v in m.groupdict().items()}
    terms = TERMS.search(stdout)
    assert terms, "no deposit_sat/price_sat line"
    deposit, price = int(terms["deposit"]), int(terms["price"])
    assert f["units"] == units and f["payments"] == (units if payments is None else payments)
    assert f["M"] == 2
    assert f["S"] == units * price
    assert f["R"] + f["C"] + f["F"] == deposit
    assert f["S"] == f["R"] + f["F"]
    assert f["C"] == deposit - f["S"]
    assert 0 < f["F"] < 2_000 and f["R"] > 0
    # the channel's bytes are its funding (any number of wallet inputs) plus its close, whose
    # size is fixed up to the payer's signature length: one P2WSH input, change and payee outputs
    funding_vb = int(re.findall(r"^\s+funding\s+[0-9a-f]{64}\s+(\d+) vB", stdout, re.M)[-1])
    close_vb = int(re.findall(r"^\s+close\s+[0-9a-f]{64}\s+(\d+) vB", stdout, re.M)[-1])
    assert f["V"] == funding_vb + close_vb
    assert 168 <= close_vb <= 172


@pytest.mark.timeout(120)
def test_demo_default_summary() -> None:
    check_summary(run_demo("--payments", "20"), 20)


@pytest.mark.timeout(120)
def test_demo_all_scenarios() -> None:
    out = run_demo("--scenario", "all", "--payments", "10")
    stories = {m["name"]: m for m in SCENARIO.finditer(out)}
    assert set(stories) == {"payer-timeout", "wrong-amount", "payee-vanishes", "fee-spike", "conflict"}
    for name, m in stories.items():
        deposit, paid, r, c, fee = (int(m[k]) for k in ("deposit", "paid", "R", "C", "F"))
        assert int(m["M"]) == 2, name
        assert r + c + fee == deposit, name
        assert paid > 0, name
        if name == "payee-vanishes":
            # the refund: everything back to the payer less the fee, nothing to the payee
            assert m["outcome"] == "refunded" and r == 0 and c == deposit - fee
        else:
            # closed with the last correct payment: the payee's share pays the fee
            assert m["outcome"] == "closed" and r + fee == paid and c == deposit - paid, name
    assert "operator_bump at" in out and "replaced it (RBF)" in out
    assert "end_reason=payment_timeout" in out
    assert "refund before expiry refused: not_expired" in out
    assert "is refused by the node" in out and "non-final" in out
    check_summary(out, 10)


@pytest.mark.timeout(120)
def test_demo_postpay_counts_signed_payments_and_units() -> None:
    # 25 chunks on a credit line of 10: the payer signs when the next unit would pass it, then settles
    check_summary(run_demo("--payments", "25", "--mode", "postpay"), 25, payments=3)
