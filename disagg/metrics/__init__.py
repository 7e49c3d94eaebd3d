"""Prometheus metrics: one CollectorRegistry per process, served as text on /metrics.

- ``names``: the metric names and histogram buckets every process shares.
- ``scheduler``: request-level histograms/counters observed by the orchestrator,
  gauges read from the worker registry's heartbeats.
- ``worker``: gauges read from a worker's engine at scrape time.
- ``http``: the aiohttp handler and a standalone /metrics server.
- ``scrape``: parses the text format back into numbers (bench, tests).
"""
