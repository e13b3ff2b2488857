"""`python -m verifier_svc --port P --model PATH ...`: run the verifier service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import sys

from specdec.model.checkpoint import CheckpointError
from verifier_svc.config import parse_config
from verifier_svc.server import serve


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)  # exits 2 with the usage on a bad flag
    try:
        asyncio.run(serve(config))
    except CheckpointError as exc:
        print(f"verifier_svc: cannot load the model: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
