"""The Bitcoin node.

- :mod:`~btcchannel.bitcoind.rpc`: :class:`Node`, the asynchronous RPC client the
  library uses (typed errors: :class:`~btcchannel.errors.NodeUnavailable`, and the
  class for each RPC error code);
- :mod:`~btcchannel.bitcoind.errors`: those classes, :class:`~btcchannel.errors.NodeError`
  subclasses registered by Bitcoin Core RPC code;
- :mod:`~btcchannel.bitcoind.binary`: finding or fetching a usable ``bitcoind``;
- :mod:`~btcchannel.bitcoind.regtest`: :class:`RegtestNode`, a regtest bitcoind
  run as a child process (tests, the demo and ``btcchannel regtest``).
"""
