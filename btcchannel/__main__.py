"""``python -m btcchannel``: the command line."""

from btcchannel.cli import main

main()
