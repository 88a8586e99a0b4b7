"""What the user can do about each error: one hint per error code, a few refined by message.

:func:`hint_for` is what the CLI prints after ``error: <code>: <message>`` (and puts in the
``hint`` field of the JSON error document). Every code of :mod:`btcchannel.errors` has a hint
(a test walks the hierarchy), so a new error class needs a line here.
"""

from __future__ import annotations

from btcchannel.errors import ChannelError

__all__ = ["HINTS", "hint_for"]

HINTS: dict[str, str] = {
    "internal": "this is a bug or an unexpected failure; run again with -v and report the output",
    "bad_request": "check the arguments (see --help); the payee's message says which field is wrong",
    "too_large": "the request is over the payee's size limit; send less at once",
    "unknown_channel": "list the channels this datadir knows with `btcchannel list` (payer) or "
    "`btcchannel channels` (payee); check --datadir and --network",
    "bad_pubkey": "the key is not a compressed secp256k1 public key; check the payee or payer software",
    "bad_script": "use a standard address type (P2WPKH, P2WSH, P2TR, P2PKH or P2SH)",
    "deposit_out_of_range": "ask the payee's limits with GET /v1/info and choose a deposit inside them",
    "expiry_out_of_range": "ask the payee's limits with GET /v1/info and choose --lifetime-blocks inside them",
    "funding_not_found": "the payee's node has not seen the funding yet; wait a little and retry",
    "funding_mismatch": "the funding does not pay this channel's script and deposit; do not reuse it",
    "not_open": "wait for the funding to confirm (`btcchannel list` shows the state), or open a channel "
    "with `btcchannel open URL --deposit-sat N --lifetime-blocks N`",
    "bad_signature": "the payer's key does not match this channel; check --datadir",
    "stale_payment": "a higher payment is already stored; run the command again to resume from it",
    "amount_out_of_range": "pay less: the total cannot exceed the deposit (`btcchannel list` shows "
    "what is paid), or open a new channel",
    "wrong_amount": "pay exactly the amount the payee's 402 answer asks for",
    "channel_closing": "this channel takes no more payments; open a new one with `btcchannel open`",
    "channel_closed": "this channel has ended; open a new one with `btcchannel open`",
    "too_many_channels": "the payee holds too many unfunded proposals; retry later",
    "not_leader": "another payee instance on this store runs the watcher and the closer; it acts instead",
    "node_unavailable": "start bitcoind (or `btcchannel regtest start`), or pass --rpc-url and "
    "--rpc-cookie / --rpc-user with --rpc-password",
    "illegal_transition": "the channel is not in a state that allows this; `btcchannel list` or "
    "`btcchannel channel ID` shows its state",
    "not_expired": "a refund is possible once the chain reaches the channel's expiry height; "
    "`btcchannel list` shows it",
    "close_uneconomic": "the payments do not pay for a close at this fee rate; try a lower --fee-rate "
    "or let the payer refund after expiry",
    "bitcoind_not_found": "install Bitcoin Core (bitcoind on PATH) or set $BITCOIND",
    "node_pruned": "the node pruned blocks the payee has not read yet: resync it (-reindex) or keep "
    "more blocks (a larger -prune), then start again",
    "protocol_violation": "the other side broke the protocol; nothing was paid for that answer; "
    "check that the URL is a btcchannel payee",
    "store_schema": "this datadir was written by a newer btcchannel; upgrade, or use another --datadir",
    "node_error": "the node refused the call; its message says why",
    "payee_unreachable": "check the URL and that the payee's service is running (`btcchannel serve`)",
    "open_timeout": "nothing is lost: the channel opens once its funding confirms; "
    "`btcchannel list` shows it, and fetch/pay use it then",
    "nothing_to_replace": "only an unconfirmed close can be replaced; `btcchannel channel ID` shows "
    "the state and close txid",
    "already_refunded": "nothing is left to refund; the deposit's spend is shown by `btcchannel list`",
    "bad_config": "fix that key of the config file: keys are the command-line option names without "
    "dashes, global ones under [global], a command's under [serve], [open]...; "
    "`btcchannel config show` prints the settings in effect",
    "usage": "see --help for the command's options and an example",
    "unauthorized": "the request was not signed by this channel's payer key; pay with the datadir that "
    "opened the channel",
    "bad_proposal_token": "the payee did not issue this proposal (another payee, or its seed changed): "
    "open a new channel; a deposit already sent comes back by refund after the expiry",
    "terms_mismatch": "propose the terms the payee states in GET /v1/info (price, mode, credit limit, timeouts)",
    "payment_required": "the request needs a payment or credit on the channel: fetch it through btcchannel's "
    "payer, which pays what the 402 asks",
    "credit_cap_reached": "the payee's cap on unpaid credit across channels is reached: settle what is owed on "
    "your other channels (btcchannel pay), then retry",
    "tls_required": "the payee serves paid routes over https only (or to clients on its own machine): use its "
    "https:// URL",
    "terms_refused": "the payee asks more than your limits allow; raise --max-price-sat (or the other "
    "limits) or choose another payee",
    "terms_changed": "the payee no longer states the terms agreed at open; nothing else is signed: close "
    "the channel or wait for its refund",
    "wrong_network": "the payee runs on another network: pass that network with --network (or set "
    "BTCCHANNEL_NETWORK, or network in [global] of the config file), or choose a payee on yours",
    "bad_backup": "give a file written by `btcchannel backup export` (or the automatic --payer-backup); a "
    "backup without keys (--no-keys) needs its seed first: `btcchannel seed restore`",
    "insufficient_funds": "fund the wallet (see --wallet) with more than the deposit plus fees, or open with "
    "a smaller --deposit-sat; nothing was sent and no channel was kept",
    "bad_url": "give the payee's URL with its scheme, e.g. http://127.0.0.1:8402",
    "metered_channel": "buy through this channel with `btcchannel fetch URL` (it pays for each unit as the "
    "payee's 402 answer asks); `pay --amount-sat` pays at will only on a channel whose payee "
    "sets no price (serve without --price-sat)",
    "amount_not_agreed": "the agreed terms do not allow this total (units received x price, agreed total, "
    "payments or end time); `btcchannel list` shows what is paid",
}

# refinements by (code, part of the message): the node's own messages are the common cases
_BY_MESSAGE: tuple[tuple[str, str, str], ...] = (
    ("node_error", "Insufficient funds", "fund the wallet (see --wallet) with more than the deposit plus fees"),
    ("node_error", "Fee estimation failed", "the node has no fee estimate yet: pass --fee-rate SAT_PER_VB"),
    ("node_error", "Requested wallet does not exist", "create or load the wallet, or pass --wallet NAME"),
    ("node_error", "Wallet file not specified", "several wallets are loaded: pass --wallet NAME"),
    ("node_error", "missing-inputs", "the coins this spends are gone (already spent or not yet known)"),
)


def hint_for(error: ChannelError) -> str:
    """The hint for ``error``: a refinement matching its message, else its code's."""
    for code, needle, hint in _BY_MESSAGE:
        if error.code == code and needle in error.message:
            return hint
    return HINTS.get(error.code, HINTS["internal"])
