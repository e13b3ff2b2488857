"""`python -m scheduler_svc --port P --verifier HOST:PORT [--proposer NAME=HOST:PORT]...`"""

from __future__ import annotations

import asyncio
import logging
import sys

from scheduler_svc.config import SchedulerConfig, config_from_args
from scheduler_svc.server import start_server
from specdec.telemetry.metrics import start_metrics_server
from specdec.rpc.security import transport
from specdec.rpc.signals import stop_event
from specdec.telemetry.tracing import setup_tracing

log = logging.getLogger("scheduler_svc")


async def serve(config: SchedulerConfig) -> int:
    """Run until SIGTERM/SIGINT (graceful shutdown) or until start-up fails."""
    tracing = setup_tracing("specdec-scheduler")
    running = await start_server(config)
    if start_metrics_server(config.metrics_port, running.scheduler.telemetry.metrics.registry, config.host):
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    stop = stop_event()
    log.info("listening on %s:%d (%s, API key %s; to the verifier and proposers: %s)", config.host, running.port,
             transport(config.tls), "required" if config.accepted_api_keys() else "not required",
             "TLS" if config.internal_tls else "plaintext")
    if running.http is not None:
        log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "https" if config.tls else "http", config.host,
                 running.http.port)
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, running.connect_task}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if running.connect_task.done() and running.connect_task.exception() is not None:
        log.error("start-up failed: %s", running.connect_task.exception())
        code = 1
    else:
        await stop.wait()
        log.info("shutting down")
    stopper.cancel()
    await running.stop()
    tracing.shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log.info("configuration:\n%s", config.describe())
    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
