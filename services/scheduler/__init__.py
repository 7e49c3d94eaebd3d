"""Scheduler: client-facing gRPC (and HTTP); tokenizes, admits, routes, relays tokens."""
