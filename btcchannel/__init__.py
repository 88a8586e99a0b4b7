"""btcchannel: unidirectional Bitcoin payment channels.

The pure channel core (keys, scripts, transactions, the state table and the
two state machines) is re-exported here; the service, client, node and regtest
layers are imported from their own modules.
"""

from btcchannel.core.channel import PayeeChannel, PayerChannel, build_multi_close
from btcchannel.core.keys import generate_private_key, public_key
from btcchannel.core.params import ChannelParams, Payment
from btcchannel.core.script import address_to_script, script_to_address
from btcchannel.core.state import ChannelEvent, ChannelState
from btcchannel.core.tx import OutPoint, tx_hex, tx_id, tx_vsize
from btcchannel.errors import ChannelError

__all__ = [
    "ChannelError",
    "ChannelEvent",
    "ChannelParams",
    "ChannelState",
    "OutPoint",
    "PayeeChannel",
    "PayerChannel",
    "Payment",
    "address_to_script",
    "build_multi_close",
    "generate_private_key",
    "public_key",
    "script_to_address",
    "tx_hex",
    "tx_id",
    "tx_vsize",
]
__version__ = "0.1.0"
