"""Process-level plumbing shared by the services: config, gRPC server and
channels, logging, ids, GPU telemetry, child processes."""
