"""The request path: the supervisor's event loop, the ledger, queueing, routing, the
worker and gateway processes and their watchdog."""
