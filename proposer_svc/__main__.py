"""`python -m proposer_svc --kind ngram|draft --port P ...`: run the proposer service until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import sys

from proposer_svc.config import parse_config


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    logging.basicConfig(stream=sys.stderr, level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info("configuration:\n%s", config.describe())
    threads = config.intra_op_threads()
    if threads > 0:
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads)
        # NumPy's BLAS too: the draft's forwards run in NumPy (specdec/model/numpy_forward.py), and OpenBLAS's own
        # threads would spin on the core the verifier computes on.
        threadpool_limits(threads, user_api="blas")
    from proposer_svc.server import serve

    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as exc:  # a bad checkpoint folder (CheckpointError), an unusable port, ...
        logging.getLogger(__name__).error("cannot start the %s proposer: %s", config.kind, exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
