"""Benchmark of the pure channel core: payer signing, payee acceptance, bare verify.

Prints medians in microseconds; the last line is
``payer_us=<x> payee_us=<y> verify_floor_us=<z>`` where the floor is
libsecp256k1's bare ECDSA verify (coincurve) over the same signatures and
digests the payee checks. Run: ``python bench/core.py``.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coincurve import PublicKey  # noqa: E402

from btcchannel import ChannelParams, ChannelState, OutPoint, PayeeChannel, PayerChannel  # noqa: E402
from btcchannel.core.keys import generate_private_key, public_key  # noqa: E402
from btcchannel.core.script import p2wpkh_script  # noqa: E402

N = 3000
ROUNDS = 3


def _median_us(samples: list[int]) -> float:
    return statistics.median(samples) / 1000.0


def main() -> None:
    payer_key, payee_key = generate_private_key(), generate_private_key()
    outpoint = OutPoint(os.urandom(32).hex(), 0)
    params = ChannelParams(
        network="regtest",
        payer_pubkey=public_key(payer_key),
        payee_pubkey=public_key(payee_key),
        expiry_height=1000,
        deposit_sat=100_000_000,
        payer_script=p2wpkh_script(public_key(payer_key)),
        funding=outpoint,
    )
    payer = PayerChannel.restore(params, payer_key, ChannelState.OPEN)
    clock = time.perf_counter_ns

    sign_times: list[int] = []
    payments = []
    for amount in range(1, N * ROUNDS + 1):
        t0 = clock()
        payment = payer.sign_payment(amount)
        sign_times.append(clock() - t0)
        payments.append(payment)

    digests = [params.sighash().digest(p.amount_sat) for p in payments[:N]]
    accept_times: list[int] = []
    verify_times: list[int] = []
    pub = PublicKey(params.payer_pubkey)
    for _ in range(ROUNDS):
        payee = PayeeChannel.restore(params, payee_key, ChannelState.OPEN)
        for payment in payments[:N]:
            t0 = clock()
            payee.accept_payment(payment.amount_sat, payment.signature, 10)
            accept_times.append(clock() - t0)
        for payment, digest in zip(payments[:N], digests):
            der = payment.signature[:-1]
            t0 = clock()
            ok = pub.verify(der, digest, hasher=None)
            verify_times.append(clock() - t0)
            assert ok

    payer_us = _median_us(sign_times)
    payee_us = _median_us(accept_times)
    floor_us = _median_us(verify_times)
    print(f"payer sign_payment       median {payer_us:8.2f} us  ({len(sign_times)} samples)")
    print(f"payee accept_payment     median {payee_us:8.2f} us  ({len(accept_times)} samples)")
    print(f"bare libsecp256k1 verify median {floor_us:8.2f} us  ({len(verify_times)} samples)")
    print(f"payee / verify floor = {payee_us / floor_us:.2f}x (target <= 1.5x)")
    print(f"payer_us={payer_us:.1f} payee_us={payee_us:.1f} verify_floor_us={floor_us:.1f}")


if __name__ == "__main__":
    main()
