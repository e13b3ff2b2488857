"""Client SDK of the specdec Generation API: sync and async clients, streaming, deadlines, typed errors.

    from specdec_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("def fib(n):", max_tokens=32).text)
"""

from specdec_client.client import (
    DEFAULT_TARGET,
    AsyncClient,
    AsyncGenerationStream,
    Client,
    GenerationStream,
)
from specdec_client.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    SpecdecError,
    Unavailable,
)
from specdec_client.types import GenerationChunk, GenerationResult, GenerationStats, ProposerStats

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "AsyncGenerationStream",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "InvalidArgument",
    "ProposerStats",
    "ResourceExhausted",
    "SpecdecError",
    "Unavailable",
]
