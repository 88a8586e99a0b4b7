"""``python -m btcchannel.payee CONFIG.json``: run a payee service from a JSON config (see
:func:`btcchannel.payee.http.main`)."""

from btcchannel.payee.http import main

if __name__ == "__main__":
    main()
