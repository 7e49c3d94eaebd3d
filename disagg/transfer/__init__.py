"""The KV data plane: one request's prompt KV handed from a prefill to a decode worker.

Split by role, as vLLM's KV connector and SGLang's ``disaggregation/base/conn.py``:
a sender on the prefill side (``sender.KvSender``: hold, lease, serve, release),
a receiver on the decode side (``receiver.KvReceiver``: reserve, fetch, verify,
commit or fail), one state enum (``state.HandoffState``) and transports behind
a small interface (``transport.Transport``; ``grpc_transport.GrpcTransport``).

Lifecycle of one handoff (states of ``HandoffState``; the legal moves are the
table in ``state.py``, anything else raises):

1. PREFILLING: the prefill worker's engine runs the prompt and samples the
   first token. No handle exists yet; a failure here is the prefill's error.
2. READY: ``KvSender.hold`` takes the held blocks under a lease (``leases.py``)
   and publishes the handle (owner address, block ids, layout) to Redis before
   the Prefill call answers.
3. TRANSFERRING: one decode worker's fetch began (gRPC: the first ``PullKv``);
   the lease is re-armed, so a stalled pull still ends. On the decode side
   ``KvReceiver.receive`` has reserved blocks and the transport fills them
   within ``transfer_timeout_s``; every (layer, block) must arrive exactly once.
4. One terminal state, reached once, frees the owner's blocks exactly once:
   - CONSUMED: the receiver verified every block and releases the handle;
   - FAILED: the receiver's fetch failed or the request was cancelled
     (receiver or scheduler releases it with consumed=false);
   - EXPIRED: nobody released it before the lease ran out.

Who frees what, exactly once:
- prefill blocks: the lease table, on the first of release and expiry
  (``LeaseTable`` pops the entry before freeing; later calls find nothing);
- decode reservation: the receiver on any failure (then the caller prefills
  the prompt + first token locally, so the client still gets a correct
  stream), or the engine's DECODE submit, which adopts the blocks (commit).

Redis mirrors the local truth: the sender writes each state there, but decides
from its own lease table, so an outage is logged, never fatal, and never
strands or double-frees blocks. The handle record carries a TTL past the lease.
If the owner cannot be reached to release, the receiver marks its handle FAILED
and deletes it (the owner, if alive, frees its blocks by lease).
"""
