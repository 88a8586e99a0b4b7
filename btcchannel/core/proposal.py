"""Stateless proposal tokens: a proposal the payee stores nothing of, authenticated by its own MAC.

Pure: no I/O. A payee that answers a proposal statelessly hands the payer a ``proposal_token``
that holds everything it needs to rebuild the channel when the funding is reported, MACed with
a key only it holds (:func:`btcchannel.core.seed.proposal_mac_key`)::

    token = ProposalToken(channel_id, issued_at, created_height, payer_pubkey, payer_script,
                          deposit_sat, expiry_height, script_version, terms).encode(mac_key, network)
    ProposalToken.decode(token, mac_key, network) -> ProposalToken   # BadProposalToken if not ours

The token is base64url (RFC 4648, no padding) of these bytes, integers big-endian:

======  ==========================================================================
bytes   field
======  ==========================================================================
1       version, ``0x01``
16      ``channel_id``
8       ``issued_at``: unix time (seconds) the payee answered the proposal
4       ``created_height``: the payee's tip height then (its funding is never in an earlier block)
33      ``payer_pubkey``
1 + n   ``payer_script``: its length ``n`` (at most 100), then the script
8       ``deposit_sat``
4       ``expiry_height``
1       ``script_version``
2 + m   the agreed terms: the length ``m``, then ``Terms.to_json()`` as JSON with sorted keys and
        no spaces (UTF-8)
32      ``HMAC-SHA256(mac_key, b"btcchannel/proposal-token/" + network + all the bytes above)``
======  ==========================================================================

The MAC covers the network, the version and every field; it is checked (in constant time,
``hmac.compare_digest``) before any field is read, so a token altered in any bit, cut short,
made for another network or by another payee (another seed) is refused whole. The payee's
channel key is not in the token: it derives from the seed and the channel id
(:func:`btcchannel.core.seed.derive_stateless_key`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from typing import Final

from btcchannel.core.terms import Terms
from btcchannel.errors import BadProposalToken, ChannelError

__all__ = ["MAX_TOKEN_CHARS", "TOKEN_VERSION", "ProposalToken"]

#: the version byte of the token format above
TOKEN_VERSION: Final = 1
#: the most characters a token may have (a longer string is refused before it is decoded)
MAX_TOKEN_CHARS: Final = 2048

_MAC_BYTES: Final = 32
_HEAD: Final = struct.Struct(">B16sQI33s")  # version, channel id, issued at, created height, payer key
_AMOUNTS: Final = struct.Struct(">QIB")  # deposit, expiry, script version
_MAX_SCRIPT: Final = 100


def _mac(mac_key: bytes, network: str, body: bytes) -> bytes:
    return hmac.new(mac_key, b"btcchannel/proposal-token/" + network.encode() + body, hashlib.sha256).digest()


@dataclass(frozen=True)
class ProposalToken:
    """Everything a stateless proposal agreed, as the payee answered it."""

    channel_id: str
    issued_at: int
    created_height: int
    payer_pubkey: bytes
    payer_script: bytes
    deposit_sat: int
    expiry_height: int
    script_version: int
    terms: Terms

    def body(self) -> bytes:
        """The token's bytes before the MAC."""
        if len(self.payer_script) > _MAX_SCRIPT:
            raise ValueError("payer_script over 100 bytes")
        terms = json.dumps(self.terms.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return b"".join(
            (
                _HEAD.pack(
                    TOKEN_VERSION,
                    bytes.fromhex(self.channel_id),
                    self.issued_at,
                    self.created_height,
                    self.payer_pubkey,
                ),
                bytes([len(self.payer_script)]),
                self.payer_script,
                _AMOUNTS.pack(self.deposit_sat, self.expiry_height, self.script_version),
                struct.pack(">H", len(terms)),
                terms,
            )
        )

    def encode(self, mac_key: bytes, network: str) -> str:
        """The token: base64url (no padding) of the body and its MAC."""
        body = self.body()
        return base64.urlsafe_b64encode(body + _mac(mac_key, network, body)).rstrip(b"=").decode()

    @classmethod
    def decode(cls, token: object, mac_key: bytes, network: str) -> ProposalToken:
        """The token's fields once its MAC checks out; ``BadProposalToken`` for anything else (not a
        string, not base64url, too short or long, a wrong MAC, a malformed field)."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise BadProposalToken("proposal_token must be a base64url string")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise BadProposalToken("proposal_token is not base64url") from None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, _mac(mac_key, network, body)):
            raise BadProposalToken("proposal_token was not issued by this payee (or was altered)")
        try:
            return cls._parse(body)
        except (ChannelError, ValueError, IndexError, struct.error, UnicodeDecodeError) as exc:
            raise BadProposalToken(f"proposal_token is malformed: {exc}") from None

    @classmethod
    def _parse(cls, body: bytes) -> ProposalToken:
        version, cid, issued_at, height, payer_pubkey = _HEAD.unpack_from(body, 0)
        if version != TOKEN_VERSION:
            raise ValueError(f"unknown token version {version}")
        pos = _HEAD.size
        n = body[pos]
        payer_script = body[pos + 1 : pos + 1 + n]
        pos += 1 + n
        deposit, expiry, script_version = _AMOUNTS.unpack_from(body, pos)
        pos += _AMOUNTS.size
        (m,) = struct.unpack_from(">H", body, pos)
        pos += 2
        if len(payer_script) != n or len(body) != pos + m:
            raise ValueError("wrong length")
        terms = Terms.from_json(json.loads(body[pos:].decode()))
        return cls(cid.hex(), issued_at, height, payer_pubkey, payer_script, deposit, expiry, script_version, terms)
