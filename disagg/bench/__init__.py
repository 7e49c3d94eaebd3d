"""`disagg bench`: load-test a running system and report latency, throughput and goodput.

- ``workload``: the requests (random lengths, shared prefix, a JSONL trace).
- ``arrivals``: when they are sent (Poisson / gamma at a rate, or all at once).
- ``backends``: one streamed request over OpenAI HTTP or gRPC, timed per chunk.
- ``runner``: sends them (rate and/or concurrency limit), with a progress bar.
- ``report``: the summary (vllm bench serve's table shape), goodput, JSON, plot.
- ``cli``: the command-line flags.
"""
