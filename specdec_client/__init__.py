"""Client SDK of the specdec Generation API: sync and async clients, streaming, deadlines, typed errors,
TLS and API keys.

    from specdec_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate("def fib(n):", max_tokens=32).text)
        print(client.chat([{"role": "user", "content": "Hi!"}]).text)    # a model with a chat template

    # an exposed server: TLS with a private CA, and an API key (or set SPECDEC_API_KEY)
    with Client("api.example.com:50051", tls_ca="ca.pem", api_key="...") as client:
        ...
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
    Unauthenticated,
    Unavailable,
)
from specdec_client.types import (
    Completion,
    GenerationChunk,
    GenerationResult,
    GenerationStats,
    LogprobCandidate,
    ModelInfo,
    ProposerStats,
    TokenLogprob,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncClient",
    "AsyncGenerationStream",
    "Cancelled",
    "Client",
    "Completion",
    "DeadlineExceeded",
    "GenerationChunk",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "InvalidArgument",
    "LogprobCandidate",
    "ModelInfo",
    "ProposerStats",
    "ResourceExhausted",
    "SpecdecError",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
]
