"""The pure channel core: keys, script and addresses, transactions and the BIP143
sighash, the channel state table, the two channel machines and the agreed terms.

Nothing in this package does I/O: no event loop, no database, no node.
"""
