"""pytest fixtures for applications built on btcchannel (regtest bitcoind)."""
