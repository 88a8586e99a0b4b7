"""Channel transactions: outpoints, BIP143 sighash, iterative/close/refund templates, vsize and fees.

Pure functions, no I/O. Transactions are built with python-bitcoinlib's
``CMutableTransaction`` and handed out as immutable ``CTransaction``; nothing
here touches python-bitcoinlib's global chain parameters.

The iterative (payment) transaction for cumulative amount ``A`` is: version 2,
locktime 0, one input spending the funding outpoint with nSequence
``0xfffffffd``, output 0 = the payer's change ``deposit - A`` to
``payer_script`` (absent when ``A == deposit``). The payer signs input 0 with
SIGHASH_SINGLE|ANYONECANPAY (SIGHASH_NONE|ANYONECANPAY for ``A == deposit``),
so only the funding outpoint, the deposit and the change are committed to.
:class:`PaymentSighash` computes that digest with everything but the change
output precomputed; :func:`bip143_sighash` is the general BIP143 algorithm.

Fees are ``ceil(fee_rate * vsize)`` from the exact vsize of the final signed
transaction: the signatures the payee (close) or payer (refund) adds are
ground to a fixed DER length of 70 bytes, so the size is known before signing.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Final, Sequence

from bitcoin.core import (
    CMutableTransaction,
    CMutableTxIn,
    CMutableTxOut,
    COutPoint,
    CTransaction,
    CTxInWitness,
    CTxWitness,
    b2lx,
)
from bitcoin.core.script import CScript, CScriptWitness

from btcchannel.core.keys import check_private_key, sign_digest_fixed_length
from btcchannel.core.script import check_payout_script, dust_limit
from btcchannel.errors import BadRequest, BadSignature, CloseUneconomic, InternalError

__all__ = [
    "OutPoint",
    "TX_VERSION",
    "ITERATIVE_SEQUENCE",
    "REFUND_SEQUENCE",
    "SIGHASH_ALL",
    "SIGHASH_NONE",
    "SIGHASH_SINGLE",
    "SIGHASH_ANYONECANPAY",
    "SIGHASH_SINGLE_ACP",
    "SIGHASH_NONE_ACP",
    "MAX_MONEY",
    "FIXED_SIG_LEN",
    "payment_sighash_type",
    "PaymentSighash",
    "bip143_sighash",
    "iterative_tx",
    "CloseInput",
    "build_close_tx",
    "build_refund_tx",
    "close_witness",
    "refund_witness",
    "tx_weight",
    "tx_vsize",
    "fee_for_vsize",
    "tx_hex",
    "tx_id",
    "dsha256",
    "ser_varint",
    "ser_output",
]

TX_VERSION: Final = 2
ITERATIVE_SEQUENCE: Final = 0xFFFFFFFD
REFUND_SEQUENCE: Final = 0xFFFFFFFD  # below 0xfffffffe: nLockTime enforced, and BIP125 replaceable
SIGHASH_ALL: Final = 0x01
SIGHASH_NONE: Final = 0x02
SIGHASH_SINGLE: Final = 0x03
SIGHASH_ANYONECANPAY: Final = 0x80
SIGHASH_SINGLE_ACP: Final = 0x83
SIGHASH_NONE_ACP: Final = 0x82
MAX_MONEY: Final = 21_000_000 * 100_000_000
#: DER length (70) plus the sighash byte of every signature this library grinds.
FIXED_SIG_LEN: Final = 71

_ZERO32: Final = b"\x00" * 32
_HEX: Final = frozenset("0123456789abcdef")


def dsha256(data: bytes) -> bytes:
    """SHA256(SHA256(data))."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def ser_varint(n: int) -> bytes:
    """Bitcoin's CompactSize encoding."""
    if n < 0xFD:
        return bytes([n])
    if n <= 0xFFFF:
        return b"\xfd" + n.to_bytes(2, "little")
    if n <= 0xFFFFFFFF:
        return b"\xfe" + n.to_bytes(4, "little")
    return b"\xff" + n.to_bytes(8, "little")


def ser_output(value_sat: int, script: bytes) -> bytes:
    """A serialised CTxOut."""
    return struct.pack("<q", value_sat) + ser_varint(len(script)) + script


@dataclass(frozen=True)
class OutPoint:
    """A transaction output reference; ``txid`` in display (reversed) hex, lowercase."""

    txid: str
    vout: int

    def __post_init__(self) -> None:
        if not isinstance(self.txid, str) or len(self.txid) != 64 or not set(self.txid) <= _HEX:
            raise BadRequest("txid must be 64 lowercase hex characters")
        if isinstance(self.vout, bool) or not isinstance(self.vout, int) or not 0 <= self.vout <= 0xFFFFFFFF:
            raise BadRequest("vout must be an integer in [0, 2^32)")

    def serialize(self) -> bytes:
        """The 36-byte wire form (internal byte order txid + LE32 vout)."""
        return bytes.fromhex(self.txid)[::-1] + struct.pack("<I", self.vout)

    def to_coutpoint(self) -> Any:
        """As python-bitcoinlib's ``COutPoint``."""
        return COutPoint(bytes.fromhex(self.txid)[::-1], self.vout)

    def to_json(self) -> dict[str, Any]:
        """``{"txid": hex, "vout": int}``."""
        return {"txid": self.txid, "vout": self.vout}

    @classmethod
    def from_json(cls, d: Any) -> OutPoint:
        """Inverse of :meth:`to_json`; BadRequest on a malformed object."""
        if not isinstance(d, dict) or set(d) != {"txid", "vout"}:
            raise BadRequest("outpoint must be {txid, vout}")
        return cls(d["txid"], d["vout"])

    def __str__(self) -> str:
        return f"{self.txid}:{self.vout}"


def payment_sighash_type(amount_sat: int, deposit_sat: int) -> int:
    """0x82 (NONE|ANYONECANPAY) for a full drain, 0x83 (SINGLE|ANYONECANPAY) otherwise."""
    return SIGHASH_NONE_ACP if amount_sat == deposit_sat else SIGHASH_SINGLE_ACP


class PaymentSighash:
    """The BIP143 digest of the iterative transaction, precomputed per channel.

    With ANYONECANPAY, hashPrevouts and hashSequence are zero; the outpoint,
    script code, deposit and nSequence are constant. Only hashOutputs
    (``dSHA256`` of the change output, for SINGLE) depends on the amount, so a
    digest costs four SHA256 compressions over a cached midstate. The full
    drain (NONE, hashOutputs zero) digest is a constant.
    """

    __slots__ = ("deposit_sat", "_midstate", "_change_tail", "_single_tail", "_none_digest")

    def __init__(self, outpoint: OutPoint, witness_script: bytes, deposit_sat: int, payer_script: bytes) -> None:
        self.deposit_sat = deposit_sat
        prefix = (
            struct.pack("<i", TX_VERSION)
            + _ZERO32
            + _ZERO32
            + outpoint.serialize()
            + ser_varint(len(witness_script))
            + witness_script
            + struct.pack("<q", deposit_sat)
            + struct.pack("<I", ITERATIVE_SEQUENCE)
        )
        self._midstate = hashlib.sha256(prefix)
        self._change_tail = ser_varint(len(payer_script)) + payer_script
        self._single_tail = struct.pack("<I", 0) + struct.pack("<I", SIGHASH_SINGLE_ACP)
        none = self._midstate.copy()
        none.update(_ZERO32 + struct.pack("<I", 0) + struct.pack("<I", SIGHASH_NONE_ACP))
        self._none_digest = hashlib.sha256(none.digest()).digest()

    def digest(self, amount_sat: int) -> bytes:
        """The digest the payer signs for cumulative ``amount_sat`` (no range checks here)."""
        if amount_sat == self.deposit_sat:
            return self._none_digest
        sha = hashlib.sha256
        h = self._midstate.copy()
        h.update(sha(sha(struct.pack("<q", self.deposit_sat - amount_sat) + self._change_tail).digest()).digest())
        h.update(self._single_tail)
        return sha(h.digest()).digest()


def bip143_sighash(tx: Any, input_index: int, script_code: bytes, amount_sat: int, hashtype: int) -> bytes:
    """The general BIP143 (segwit v0) signature hash of input ``input_index`` of ``tx``."""
    base = hashtype & 0x1F
    acp = bool(hashtype & SIGHASH_ANYONECANPAY)
    hash_prevouts = _ZERO32
    hash_sequence = _ZERO32
    hash_outputs = _ZERO32
    if not acp:
        hash_prevouts = dsha256(b"".join(txin.prevout.serialize() for txin in tx.vin))
        if base not in (SIGHASH_SINGLE, SIGHASH_NONE):
            hash_sequence = dsha256(b"".join(struct.pack("<I", txin.nSequence) for txin in tx.vin))
    if base not in (SIGHASH_SINGLE, SIGHASH_NONE):
        hash_outputs = dsha256(b"".join(ser_output(o.nValue, bytes(o.scriptPubKey)) for o in tx.vout))
    elif base == SIGHASH_SINGLE and input_index < len(tx.vout):
        out = tx.vout[input_index]
        hash_outputs = dsha256(ser_output(out.nValue, bytes(out.scriptPubKey)))
    txin = tx.vin[input_index]
    preimage = (
        struct.pack("<i", tx.nVersion)
        + hash_prevouts
        + hash_sequence
        + txin.prevout.serialize()
        + ser_varint(len(script_code))
        + script_code
        + struct.pack("<q", amount_sat)
        + struct.pack("<I", txin.nSequence)
        + hash_outputs
        + struct.pack("<I", tx.nLockTime)
        + struct.pack("<I", hashtype)
    )
    return dsha256(preimage)


def iterative_tx(outpoint: OutPoint, deposit_sat: int, amount_sat: int, payer_script: bytes) -> Any:
    """The unsigned iterative transaction for cumulative ``amount_sat`` (a ``CTransaction``)."""
    vin = [CMutableTxIn(outpoint.to_coutpoint(), CScript(), ITERATIVE_SEQUENCE)]
    vout = [] if amount_sat == deposit_sat else [CMutableTxOut(deposit_sat - amount_sat, CScript(payer_script))]
    return CTransaction.from_tx(CMutableTransaction(vin, vout, 0, TX_VERSION))


def close_witness(payer_sig: bytes, payee_sig: bytes, witness_script: bytes) -> list[bytes]:
    """``[payer_sig, payee_sig, 0x01, witness_script]``."""
    return [payer_sig, payee_sig, b"\x01", witness_script]


def refund_witness(payer_sig: bytes, witness_script: bytes) -> list[bytes]:
    """``[payer_sig, <empty>, witness_script]``."""
    return [payer_sig, b"", witness_script]


def tx_weight(tx: Any) -> int:
    """BIP141 weight: 3 x stripped size + total size."""
    stripped = len(tx.serialize({"include_witness": False}))
    return stripped * 3 + len(tx.serialize())


def tx_vsize(tx: Any) -> int:
    """Virtual size: ceil(weight / 4)."""
    return (tx_weight(tx) + 3) // 4


def fee_for_vsize(fee_rate_sat_vb: float, vsize: int) -> int:
    """``ceil(fee_rate * vsize)``, the rate taken at its shortest decimal form (1.1 means 11/10)."""
    if isinstance(fee_rate_sat_vb, bool) or not isinstance(fee_rate_sat_vb, (int, float, Decimal, Fraction)):
        raise BadRequest("fee rate must be a number")
    try:
        rate = Fraction(Decimal(repr(fee_rate_sat_vb)) if isinstance(fee_rate_sat_vb, float) else fee_rate_sat_vb)
    except (ValueError, InvalidOperation, OverflowError):
        raise BadRequest("fee rate must be finite") from None
    if rate < 0:
        raise BadRequest("fee rate must not be negative")
    return math.ceil(rate * vsize)


def tx_hex(tx: Any) -> str:
    """The full (witness) serialisation as hex, for ``sendrawtransaction``."""
    return str(tx.serialize().hex())


def tx_id(tx: Any) -> str:
    """The txid in display hex."""
    return str(b2lx(tx.GetTxid()))


def _check_amount(name: str, value: int, low: int = 0, high: int = MAX_MONEY) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}]")


@dataclass(frozen=True)
class CloseInput:
    """One channel to spend in a close: its funding, the payment to settle and the payee's key."""

    outpoint: OutPoint
    deposit_sat: int
    witness_script: bytes
    payer_script: bytes
    amount_sat: int
    payer_signature: bytes  # DER + sighash byte
    payee_privkey: bytes = field(repr=False)

    @property
    def change_sat(self) -> int:
        """What returns to the payer (0 for a full drain)."""
        return self.deposit_sat - self.amount_sat

    @property
    def full_drain(self) -> bool:
        """True when the payment is the whole deposit (NONE|ANYONECANPAY, no payer output)."""
        return self.amount_sat == self.deposit_sat


def _finish(mtx: Any, witnesses: list[list[bytes]]) -> Any:
    mtx.wit = CTxWitness([CTxInWitness(CScriptWitness(stack)) for stack in witnesses])
    return CTransaction.from_tx(mtx)


def build_close_tx(
    inputs: Sequence[CloseInput],
    payee_script: bytes,
    fee_rate_sat_vb: float,
    *,
    min_fee_sat: int = 0,
) -> Any:
    """The fully signed close spending one or several channels; a ``CTransaction``.

    Layout: the SINGLE-signed inputs first, input ``i`` paired with its payer
    change at output ``i`` (BIP143 does not commit to the input index, so each
    payer signature holds at any index); then the full-drain (NONE) inputs;
    then one payee output of ``sum(A) - fee`` to ``payee_script``. The payee
    signs every input with SIGHASH_ALL. ``fee = max(min_fee_sat, ceil(rate *
    vsize))`` with the exact vsize of the returned transaction. CloseUneconomic
    if the payee output would fall below the dust limit of ``payee_script``.
    """
    check_payout_script(payee_script)
    _check_amount("min_fee_sat", min_fee_sat)
    if not inputs:
        raise BadRequest("a close needs at least one channel")
    if len({i.outpoint for i in inputs}) != len(inputs):
        raise BadRequest("the same funding outpoint appears twice")
    for inp in inputs:
        check_private_key(inp.payee_privkey)
        _check_amount("deposit_sat", inp.deposit_sat, 1)
        _check_amount("amount_sat", inp.amount_sat, 1, inp.deposit_sat)
        if not inp.payer_signature or inp.payer_signature[-1] != payment_sighash_type(inp.amount_sat, inp.deposit_sat):
            raise BadSignature("payer signature has the wrong sighash type for its amount")
    ordered = [i for i in inputs if not i.full_drain] + [i for i in inputs if i.full_drain]
    vin = [CMutableTxIn(i.outpoint.to_coutpoint(), CScript(), ITERATIVE_SEQUENCE) for i in ordered]
    vout = [CMutableTxOut(i.change_sat, CScript(i.payer_script)) for i in ordered if not i.full_drain]
    payee_out = CMutableTxOut(0, CScript(payee_script))
    vout.append(payee_out)
    mtx = CMutableTransaction(vin, vout, 0, TX_VERSION)
    placeholder = b"\x00" * FIXED_SIG_LEN
    vsize = tx_vsize(_finish(mtx, [close_witness(i.payer_signature, placeholder, i.witness_script) for i in ordered]))
    fee = max(min_fee_sat, fee_for_vsize(fee_rate_sat_vb, vsize))
    value = sum(i.amount_sat for i in ordered) - fee
    if value < dust_limit(payee_script):
        raise CloseUneconomic(
            f"payee output {value} sat (paid {value + fee} - fee {fee}) is below the dust limit "
            f"{dust_limit(payee_script)} of its script"
        )
    payee_out.nValue = value
    frozen = CTransaction.from_tx(mtx)
    witnesses = []
    for index, inp in enumerate(ordered):
        digest = bip143_sighash(frozen, index, inp.witness_script, inp.deposit_sat, SIGHASH_ALL)
        payee_sig = sign_digest_fixed_length(inp.payee_privkey, digest) + bytes([SIGHASH_ALL])
        witnesses.append(close_witness(inp.payer_signature, payee_sig, inp.witness_script))
    tx = _finish(mtx, witnesses)
    if tx_vsize(tx) != vsize:  # pragma: no cover - guarded by the fixed signature length
        raise InternalError("close vsize changed while signing")
    return tx


def build_refund_tx(
    outpoint: OutPoint,
    deposit_sat: int,
    witness_script: bytes,
    expiry_height: int,
    payer_privkey: bytes,
    dest_script: bytes,
    fee_rate_sat_vb: float,
    *,
    min_fee_sat: int = 0,
) -> Any:
    """The payer's signed refund: nLockTime ``expiry_height``, nSequence 0xfffffffd (BIP125-replaceable:
    the payee may outbid it with a close while it is unconfirmed),
    witness ``[payer_sig(ALL), <empty>, script]``, one output ``deposit - fee`` to ``dest_script``.

    It is only valid once the chain tip has reached ``expiry_height`` (no tip check here).
    CloseUneconomic if the output would be dust.
    """
    check_payout_script(dest_script)
    check_private_key(payer_privkey)
    _check_amount("deposit_sat", deposit_sat, 1)
    _check_amount("min_fee_sat", min_fee_sat)
    vin = [CMutableTxIn(outpoint.to_coutpoint(), CScript(), REFUND_SEQUENCE)]
    out = CMutableTxOut(0, CScript(dest_script))
    mtx = CMutableTransaction(vin, [out], expiry_height, TX_VERSION)
    vsize = tx_vsize(_finish(mtx, [refund_witness(b"\x00" * FIXED_SIG_LEN, witness_script)]))
    fee = max(min_fee_sat, fee_for_vsize(fee_rate_sat_vb, vsize))
    value = deposit_sat - fee
    if value < dust_limit(dest_script):
        raise CloseUneconomic(f"refund output {value} sat is below the dust limit of its script")
    out.nValue = value
    digest = bip143_sighash(CTransaction.from_tx(mtx), 0, witness_script, deposit_sat, SIGHASH_ALL)
    sig = sign_digest_fixed_length(payer_privkey, digest) + bytes([SIGHASH_ALL])
    tx = _finish(mtx, [refund_witness(sig, witness_script)])
    if tx_vsize(tx) != vsize:  # pragma: no cover - guarded by the fixed signature length
        raise InternalError("refund vsize changed while signing")
    return tx
