"""The payee: its service, closer, chain watcher, HTTP app and paid-route middleware."""
