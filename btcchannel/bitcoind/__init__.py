"""The Bitcoin node: the RPC client, finding or fetching ``bitcoind``, and a regtest node."""
