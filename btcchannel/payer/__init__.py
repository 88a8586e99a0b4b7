"""The payer: the HTTP client of a payee and metered fetching."""
