"""Prometheus metrics of the services: what each one counts, and the HTTP endpoint that serves them.

Each service makes its own metrics object (in its own registry, so that several servers in one test
process do not collide) and serves it on `--metrics-port` (env SPECDEC_METRICS_PORT; 0 = no endpoint).
docs/metrics.md lists every metric with its meaning and the PromQL for acceptance rate and goodput.
Names follow Prometheus conventions: base units (seconds, tokens) in the name, `_total` on counters.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds: from a fast CPU step (~ms) to a long generation (minutes).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
NO_PROPOSER_LABEL = "none"  # the proposer label of a request step without speculation


class SchedulerMetrics:
    """The scheduler's view: requests, tokens, speculation and the step loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("specdec_requests", "Generation requests that ended, by finish reason "
                                "(length, eos, stop, cancelled, failed)", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("specdec_generated_tokens", "Output tokens streamed to clients", registry=r)
        self.proposed_tokens = Counter("specdec_proposed_tokens", "Candidate tokens verified, by proposer",
                                       ["proposer"], registry=r)
        self.accepted_tokens = Counter("specdec_accepted_tokens", "Of the proposed tokens, those the target "
                                       "accepted, by proposer", ["proposer"], registry=r)
        self.committed_tokens = Counter("specdec_step_committed_tokens", "Tokens engine steps added to requests "
                                        "(first tokens + accepted + bonus)", registry=r)
        self.request_latency = Histogram("specdec_request_latency_seconds", "Arrival to last token of a request",
                                         buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram("specdec_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.step_time = Histogram("specdec_step_seconds", "Wall time of one engine step (admission to commit)",
                                   buckets=STEP_BUCKETS_S, registry=r)
        self.chosen_k = Histogram("specdec_chosen_k", "Candidates asked for per request and step (0 = none), "
                                  "by proposer", ["proposer"], buckets=K_BUCKETS, registry=r)
        self.running = Gauge("specdec_running_requests", "Requests holding a verifier slot", registry=r)
        self.waiting = Gauge("specdec_waiting_requests", "Requests queued for a slot", registry=r)
        self.free_slots = Gauge("specdec_free_verifier_slots", "Verifier slots the scheduler may still fill",
                                registry=r)
        self.cost_model_error = Gauge(
            "specdec_cost_model_relative_error", "Moving average of |predicted - measured| / measured step time "
            "of the policy's cost model (NaN until it has predicted a step, or under policies without one)",
            registry=r)

    def watch(self, running: Callable[[], float], waiting: Callable[[], float],
              free_slots: Callable[[], float], cost_model_error: Callable[[], float] | None = None) -> None:
        """Read the gauges from these callables at scrape time (nothing to keep in step)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.free_slots.set_function(free_slots)
        self.cost_model_error.set_function(cost_model_error or (lambda: float("nan")))


class VerifierMetrics:
    """The target model's side: calls, batched tokens, forward time, slots."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.calls = Counter("specdec_verifier_requests", "Prefill / Verify / Release calls served, by method",
                             ["method"], registry=r)
        self.batched_tokens = Counter("specdec_verifier_batched_tokens", "Tokens run through the target model "
                                      "(prompt tokens in Prefill, pending + candidates in Verify)", ["method"],
                                      registry=r)
        self.forward_time = Histogram("specdec_verifier_forward_seconds", "Model forward time of one call",
                                      ["method"], buckets=STEP_BUCKETS_S, registry=r)
        self.free_slots = Gauge("specdec_verifier_free_slots", "KV-cache slots free in the verifier", registry=r)


class ProposerMetrics:
    """A proposer's side: steps, candidates, time."""

    def __init__(self, kind: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.kind = kind
        self.steps = Counter("specdec_proposer_steps", "ProposeRequests answered", ["kind"], registry=r).labels(kind)
        self.proposed_tokens = Counter("specdec_proposer_proposed_tokens", "Candidate tokens sent back",
                                       ["kind"], registry=r).labels(kind)
        self.propose_time = Histogram("specdec_proposer_step_seconds", "Time to answer one ProposeRequest",
                                      ["kind"], buckets=STEP_BUCKETS_S, registry=r).labels(kind)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> int | None:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0 serves nothing (returns
    None), else returns the port."""
    if not port:
        return None
    start_http_server(port, addr=host, registry=registry)
    return port
