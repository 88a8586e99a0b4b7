"""btcchannel: unidirectional Bitcoin payment channels.

The pure channel core (keys, scripts, transactions and the two state
machines) is re-exported here; the service, client, node and regtest layers
are imported from their own modules.
"""

from btcchannel.errors import ChannelError

__all__ = ["ChannelError"]
__version__ = "0.1.0"
