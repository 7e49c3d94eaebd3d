"""`disagg plan`: size a cluster by simulation (pure; the CLI does the I/O).

- ``profile``: measured worker costs (prefill ms vs tokens, decode step ms vs
  batch and context, KV transfer ms vs bytes), read from the engine
  benchmark's ``--profile-out`` JSON.
- ``workload``: requests to simulate: Poisson arrivals over a mix of length
  classes, or a JSONL trace.
- ``sim``: the discrete-event simulator of prefill and decode workers.
- ``search``: goodput under an SLO, and the P:D ratio and local-prefill
  threshold that maximize it for a cluster size.
- ``cli``: flags and the top level of `disagg plan`.
"""
