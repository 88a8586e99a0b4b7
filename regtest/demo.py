"""The regtest demo: start a node, mine, show what the node says."""

from __future__ import annotations

from btcchannel.regtest import RegtestNode


def main() -> None:
    with RegtestNode() as node:
        node.prepare(201)
        print(node.status())


if __name__ == "__main__":
    main()
