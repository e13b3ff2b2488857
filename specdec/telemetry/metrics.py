"""Prometheus metrics of the services: what each one counts, and the HTTP endpoint that serves them.

Each service makes its own metrics object (in its own registry, so that several servers in one test
process do not collide) and serves it on `--metrics-port` (env SPECDEC_METRICS_PORT; 0 = no endpoint).
docs/metrics.md lists every metric with its meaning and the PromQL for acceptance rate and goodput.
Names follow Prometheus conventions: base units (seconds, tokens) in the name, `_total` on counters.
Every registry also carries the standard process metrics (`process_*`: CPU, memory, open files;
`python_info`; `python_gc_*`), as the default registry of prometheus_client would.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)

# Seconds: from a fast CPU step (~ms) to a long generation (minutes).
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
K_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
# Seconds per output token: ~1 ms for a small model on a GPU or with speculation, up to seconds under load.
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LENGTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)  # tokens
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)  # requests in one step
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
        self.time_per_output_token = Histogram(
            "specdec_time_per_output_token_seconds", "First to last token of a completed request, divided by its "
            "output tokens after the first", buckets=TOKEN_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            "specdec_inter_token_latency_seconds", "Time between two steps that gave a request tokens (one "
            "observation per step; with speculation a step gives several)", buckets=TOKEN_BUCKETS_S, registry=r)
        self.queue_time = Histogram("specdec_request_queue_time_seconds", "Arrival to admission (the start of "
                                    "the step that prefills the request)", buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_length = Histogram("specdec_request_prompt_tokens", "Prompt tokens of a completed request",
                                       buckets=LENGTH_BUCKETS, registry=r)
        self.generation_length = Histogram("specdec_request_generation_tokens", "Output tokens of a completed "
                                           "request", buckets=LENGTH_BUCKETS, registry=r)
        self.batch_size = Histogram("specdec_step_batch_size", "Requests verified in one engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        # vLLM's spec_decode_num_accepted_tokens_per_pos, with the number of times each position was proposed
        # beside it: their ratio is the acceptance rate at that position, given the earlier ones were proposed.
        self.proposed_per_position = Counter(
            "specdec_proposed_tokens_per_position", "Request steps whose candidates reached position p "
            "(0 = the first candidate; a tree's depth counts), by proposer", ["proposer", "position"], registry=r)
        self.accepted_per_position = Counter(
            "specdec_accepted_tokens_per_position", "Request steps whose accepted path reached position p, by "
            "proposer", ["proposer", "position"], registry=r)
        add_process_collectors(r)

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
        self.kv_cache_tokens = Gauge("specdec_verifier_kv_cache_tokens", "Tokens held in the KV cache, all "
                                     "slots together", registry=r)
        self.kv_cache_capacity = Gauge("specdec_verifier_kv_cache_capacity_tokens", "Tokens the KV cache can hold: "
                                       "slots x tokens per slot", registry=r)
        self.kv_cache_usage = Gauge("specdec_verifier_kv_cache_usage_ratio", "Tokens held / capacity (0..1)",
                                    registry=r)
        self.model_info = Info("specdec_model", "The target model the verifier serves: checkpoint folder, device, "
                               "dtype, context length (max_seq_len) and KV-cache slots", registry=r)
        add_process_collectors(r)

    def watch(self, free_slots: Callable[[], float], kv_cache_tokens: Callable[[], float],
              kv_cache_capacity_tokens: int) -> None:
        """Read the slot and KV-cache gauges from these callables at scrape time."""
        self.free_slots.set_function(free_slots)
        self.kv_cache_tokens.set_function(kv_cache_tokens)
        self.kv_cache_capacity.set(kv_cache_capacity_tokens)
        self.kv_cache_usage.set_function(lambda: kv_cache_tokens() / kv_cache_capacity_tokens
                                         if kv_cache_capacity_tokens else 0.0)

    def describe_model(self, *, model: str, device: str, dtype: str, max_seq_len: int, max_slots: int) -> None:
        """Set `specdec_model_info` (a constant 1 whose labels describe the model)."""
        self.model_info.info({"model": model, "device": device, "dtype": dtype, "max_seq_len": str(max_seq_len),
                              "max_slots": str(max_slots)})


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
        add_process_collectors(r)


def add_process_collectors(registry: CollectorRegistry) -> None:
    """The standard process, platform and GC metrics on `registry`, unless it has them already (the default
    registry of prometheus_client does)."""
    # A registry refuses a second collector of the same names: that is how "already there" shows.
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        try:
            registry.register(collector)
        except ValueError:
            pass


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> int | None:
    """Serve `registry` at http://host:port/metrics from a daemon thread; port 0 serves nothing (returns
    None), else returns the port."""
    if not port:
        return None
    start_http_server(port, addr=host, registry=registry)
    return port
