"""The Bitcoin node.

- :mod:`~btcchannel.bitcoind.rpc`: :class:`Node`, the asynchronous RPC client the
  library uses (typed errors: :class:`~btcchannel.errors.NodeError` subclasses
  per RPC code, :class:`~btcchannel.errors.NodeUnavailable`);
- :mod:`~btcchannel.bitcoind.binary`: finding or fetching a usable ``bitcoind``;
- :mod:`~btcchannel.bitcoind.regtest`: :class:`RegtestNode`, a regtest bitcoind
  run as a child process (tests, the demo and ``btcchannel regtest``).
"""
