from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerLoad(_message.Message):
    __slots__ = ("worker_id", "requests", "tokens", "blocks", "dispatched", "head_rank_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    HEAD_RANK_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    requests: int
    tokens: int
    blocks: int
    dispatched: int
    head_rank_ms: float
    def __init__(self, worker_id: _Optional[str] = ..., requests: _Optional[int] = ..., tokens: _Optional[int] = ..., blocks: _Optional[int] = ..., dispatched: _Optional[int] = ..., head_rank_ms: _Optional[float] = ...) -> None: ...

class SchedulerLoads(_message.Message):
    __slots__ = ("replica_id", "loads", "unix_ms", "seq")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LOADS_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    loads: _containers.RepeatedCompositeFieldContainer[WorkerLoad]
    unix_ms: int
    seq: int
    def __init__(self, replica_id: _Optional[str] = ..., loads: _Optional[_Iterable[_Union[WorkerLoad, _Mapping]]] = ..., unix_ms: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class PrefixSet(_message.Message):
    __slots__ = ("worker_id", "version", "block_hashes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    version: int
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, worker_id: _Optional[str] = ..., version: _Optional[int] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...
