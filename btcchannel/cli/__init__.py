"""The ``btcchannel`` command line: a thin layer over the library.

``main`` is the root group (``btcchannel = btcchannel.cli:main``, also
``python -m btcchannel``); its global options and their ``BTCCHANNEL_<NAME>``
variables, and the one place library errors become text and exit codes, are in
``_app``. The commands live by role:

- ``payee``: serve, channels, channel, close, bump
- ``payer``: open, pay, fetch, refund, list, backup export|import
- ``seed``: seed show|restore (the payer's channel keys derive from it)
- ``ops``: summary, forget, restore
- ``regtest``: regtest install|start|stop|status|mine
- ``config``: config show (the settings in effect; the file itself is read by ``_config``)
"""

from __future__ import annotations

from btcchannel.cli import config, ops, payee, payer, regtest, seed
from btcchannel.cli._app import Settings, main

__all__ = ["Settings", "main"]

for _command in (*payee.COMMANDS, *payer.COMMANDS, *ops.COMMANDS, *seed.COMMANDS, *regtest.COMMANDS, *config.COMMANDS):
    main.add_command(_command)
