"""Moving KV blocks between workers' pools over gRPC, in chunks."""
