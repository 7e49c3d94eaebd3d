"""Control plane over Redis/Valkey: worker registry, KV handles, embedded server.

Metadata only, never KV bytes. Every value stored is a serialized protobuf
message from ``disagg.v1.common_pb2``; key names live in ``keys``.
"""

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.metastore.store import Heartbeat, MetaStore, MetaStoreUnavailable

__all__ = [
    "EmbeddedValkey",
    "Heartbeat",
    "MetaStore",
    "MetaStoreUnavailable",
    "start_embedded_valkey",
]
