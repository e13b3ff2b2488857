"""Each service's Prometheus endpoint, scraped before and after a few requests through the whole stack:
the counters must move consistently with what the client saw (generated tokens = tokens received,
accepted <= proposed per proposer, the proposers sent at least what the scheduler verified, one
latency, time-to-first-token, queue-time and time-per-token observation per request, per-position
counts that add up to the per-proposer ones), the KV cache holds tokens while a request runs, and the
gauges settle once all is done. Every service also serves the standard process metrics.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specdec.ops.launcher import metrics_port
from specdec_client import AsyncClient

SCRAPE_TIMEOUT_S = 5.0


def scrape(stack, name: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a service's /metrics as {(sample name, sorted labels): value}."""
    spec = stack.spec(name)
    url = f"http://127.0.0.1:{metrics_port(spec)}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


SERVICES = ("scheduler", "verifier", "proposer-ngram", "proposer-draft")
LONG_REQUEST = ([4, 4, 2] * 10, 200)  # prompt, max_tokens


def test_counters_move_consistently(observed_stack):
    stack, _ = observed_stack
    assert all(metrics_port(stack.spec(name)) for name in SERVICES)
    before = {name: scrape(stack, name) for name in SERVICES}

    requests = [([5, 6, 7, 8] * 5, 10, "ngram"), ([9, 10, 11] * 4, 7, "draft"), ([3, 1, 4, 1, 5], 9, ""),
                ([2, 7, 1, 8, 2, 8] * 3, 6, "draft")]

    async def run():
        async with AsyncClient(stack.spec("scheduler").address, timeout=60) as client:
            async def one(prompt, max_tokens, proposer):
                tokens = []
                async for chunk in client.stream(prompt, max_tokens=max_tokens, proposer=proposer, ignore_eos=True):
                    tokens.extend(chunk.token_ids)
                return tokens

            async def long_one():
                """A longer request: the verifier's KV cache is scraped while it runs."""
                seen = None
                async for chunk in client.stream(LONG_REQUEST[0], max_tokens=LONG_REQUEST[1], proposer="none",
                                                 ignore_eos=True):
                    if seen is None:
                        seen = await asyncio.to_thread(scrape, stack, "verifier")
                return seen

            *tokens, kv = await asyncio.gather(*(one(*r) for r in requests), long_one())
            return tokens, kv

    received, kv_while_running = asyncio.run(run())
    assert [len(t) for t in received] == [r[1] for r in requests]
    after = {name: scrape(stack, name) for name in SERVICES}
    s0, s1 = before["scheduler"], after["scheduler"]
    requests.append(LONG_REQUEST)
    received.append(range(LONG_REQUEST[1]))

    assert delta(s0, s1, "specdec_generated_tokens_total") == sum(len(t) for t in received)
    assert delta(s0, s1, "specdec_prompt_tokens_total") == sum(len(r[0]) for r in requests)
    assert delta(s0, s1, "specdec_requests_total", finish_reason="length") == len(requests)
    assert delta(s0, s1, "specdec_request_latency_seconds_count") == len(requests)
    assert delta(s0, s1, "specdec_time_to_first_token_seconds_count") == len(requests)
    assert delta(s0, s1, "specdec_request_queue_time_seconds_count") == len(requests)
    assert delta(s0, s1, "specdec_time_per_output_token_seconds_count") == len(requests)  # all of > 1 token
    assert delta(s0, s1, "specdec_request_prompt_tokens_sum") == sum(len(r[0]) for r in requests)
    assert delta(s0, s1, "specdec_request_generation_tokens_sum") == sum(len(t) for t in received)
    steps = delta(s0, s1, "specdec_step_seconds_count")
    assert delta(s0, s1, "specdec_step_batch_size_count") == steps
    assert delta(s0, s1, "specdec_step_batch_size_sum") >= steps
    # One inter-token gap per request and step, as one chosen k.
    request_steps = sum(delta(s0, s1, "specdec_chosen_k_count", proposer=p) for p in ("ngram", "draft", "none"))
    assert delta(s0, s1, "specdec_inter_token_latency_seconds_count") == request_steps > 0
    assert steps >= max(r[1] for r in requests) / 4  # at most k + 1 = 4 tokens per step
    # Every request's first token comes from a Prefill, the rest from steps.
    assert delta(s0, s1, "specdec_step_committed_tokens_total") >= sum(len(t) for t in received)

    for proposer in ("ngram", "draft"):
        proposed = delta(s0, s1, "specdec_proposed_tokens_total", proposer=proposer)
        accepted = delta(s0, s1, "specdec_accepted_tokens_total", proposer=proposer)
        assert 0 < proposed and 0 <= accepted <= proposed, (proposer, proposed, accepted)
        # What the proposer service sent is what the scheduler verified (no proposer faults here).
        sent = delta(before[f"proposer-{proposer}"], after[f"proposer-{proposer}"],
                     "specdec_proposer_proposed_tokens_total", kind=proposer)
        assert sent == proposed, (proposer, sent, proposed)
        assert delta(s0, s1, "specdec_chosen_k_count", proposer=proposer) > 0
        # Per position (chains): the counts add up to the proposer's, and no position is accepted more often
        # than it was proposed, nor proposed more often than the one before it.
        per_position = [(delta(s0, s1, "specdec_proposed_tokens_per_position_total", proposer=proposer,
                               position=str(p)),
                         delta(s0, s1, "specdec_accepted_tokens_per_position_total", proposer=proposer,
                               position=str(p))) for p in range(8)]
        assert sum(n for n, _ in per_position) == proposed and sum(a for _, a in per_position) == accepted
        assert all(a <= n for n, a in per_position)
        assert all(later[0] <= earlier[0] for earlier, later in zip(per_position, per_position[1:]))

    # Verifier: one Verify per step, one Prefill at least, tokens through the model.
    v0, v1 = before["verifier"], after["verifier"]
    assert delta(v0, v1, "specdec_verifier_requests_total", method="Verify") == steps
    assert delta(v0, v1, "specdec_verifier_requests_total", method="Prefill") >= 1
    assert delta(v0, v1, "specdec_verifier_batched_tokens_total", method="Prefill") == \
        sum(len(r[0]) for r in requests)

    # The KV cache: the long request's prompt (at least) was held while it ran, within the capacity that the
    # model info describes.
    info = next(labels for (name, labels), _ in v1.items() if name == "specdec_model_info")
    info = dict(info)
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["model"]
    capacity = int(info["max_slots"]) * int(info["max_seq_len"])
    assert value(v1, "specdec_verifier_kv_cache_capacity_tokens") == capacity
    assert len(LONG_REQUEST[0]) <= value(kv_while_running, "specdec_verifier_kv_cache_tokens") <= capacity
    assert value(kv_while_running, "specdec_verifier_kv_cache_usage_ratio") == pytest.approx(
        value(kv_while_running, "specdec_verifier_kv_cache_tokens") / capacity)

    # Every service serves the standard process metrics.
    for name in SERVICES:
        assert value(after[name], "process_resident_memory_bytes") > 0, name
        assert value(after[name], "process_cpu_seconds_total") > 0, name
        assert any(sample == "python_info" for sample, _ in after[name]), name

    # Gauges settle: nothing running or waiting, every slot free again (finished requests are released
    # by the engine's next iteration, so allow it a moment); the KV cache holds nothing.
    deadline = time.monotonic() + 10
    while True:
        s, v = scrape(stack, "scheduler"), scrape(stack, "verifier")
        settled = (value(s, "specdec_running_requests") == 0 and value(s, "specdec_waiting_requests") == 0
                   and value(s, "specdec_free_verifier_slots") == value(v, "specdec_verifier_free_slots") > 0
                   and value(v, "specdec_verifier_kv_cache_tokens") == 0)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert settled, {k: (value(s, k)) for k in ("specdec_running_requests", "specdec_waiting_requests",
                                                   "specdec_free_verifier_slots")} | {
        "verifier_free": value(v, "specdec_verifier_free_slots"), "kv": value(v, "specdec_verifier_kv_cache_tokens")}


def test_metrics_port_zero_serves_nothing():
    from specdec.telemetry.metrics import SchedulerMetrics, start_metrics_server

    assert start_metrics_server(0, SchedulerMetrics().registry) is None


@pytest.mark.parametrize("module", ["verifier_svc.config", "proposer_svc.config", "scheduler_svc.config"])
def test_metrics_port_flag_and_env(module):
    """--metrics-port, with SPECDEC_METRICS_PORT as fallback and 0 (off) as default, in every service."""
    import importlib

    config_module = importlib.import_module(module)
    parse = getattr(config_module, "parse_config", None) or config_module.config_from_args
    base = ["--verifier", "127.0.0.1:1"] if module.startswith("scheduler") else []
    assert parse(base, env={}).metrics_port == 0
    assert parse([*base, "--metrics-port", "9464"], env={"SPECDEC_METRICS_PORT": "9100"}).metrics_port == 9464
    assert parse(base, env={"SPECDEC_METRICS_PORT": "9100"}).metrics_port == 9100


def test_cost_model_error_gauge_reads_the_policy_at_scrape_time():
    from prometheus_client import generate_latest

    from specdec.telemetry.metrics import SchedulerMetrics

    error = [float("nan")]
    metrics = SchedulerMetrics()
    metrics.watch(running=lambda: 1, waiting=lambda: 0, free_slots=lambda: 3, cost_model_error=lambda: error[0])
    error[0] = 0.125
    text = generate_latest(metrics.registry).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["specdec_cost_model_relative_error"] == 0.125
    assert samples["specdec_running_requests"] == 1 and samples["specdec_free_verifier_slots"] == 3


def test_verifier_kv_cache_and_model_info_gauges():
    from prometheus_client import generate_latest

    from specdec.telemetry.metrics import VerifierMetrics

    held = [0]
    metrics = VerifierMetrics()
    metrics.watch(free_slots=lambda: 3, kv_cache_tokens=lambda: held[0], kv_cache_capacity_tokens=4 * 512)
    metrics.describe_model(model="/models/target", device="cuda:0", dtype="float32", max_seq_len=512, max_slots=4)
    held[0] = 512
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(metrics.registry).decode()) for s in f.samples}
    assert samples[("specdec_verifier_kv_cache_tokens", ())] == 512
    assert samples[("specdec_verifier_kv_cache_capacity_tokens", ())] == 2048
    assert samples[("specdec_verifier_kv_cache_usage_ratio", ())] == 0.25
    assert samples[("specdec_model_info", (("device", "cuda:0"), ("dtype", "float32"), ("max_seq_len", "512"),
                                           ("max_slots", "4"), ("model", "/models/target")))] == 1


def test_process_metrics_on_every_registry_once():
    from prometheus_client import REGISTRY, CollectorRegistry

    from specdec.telemetry.metrics import ProposerMetrics, SchedulerMetrics, VerifierMetrics, add_process_collectors

    for metrics in (SchedulerMetrics(), VerifierMetrics(), ProposerMetrics("ngram")):
        assert metrics.registry.get_sample_value("process_resident_memory_bytes") > 0
        assert metrics.registry.get_sample_value("python_gc_collections_total", {"generation": "0"}) is not None
        assert any(m.name == "python_info" for m in metrics.registry.collect())
    add_process_collectors(REGISTRY)  # the default registry has them already: no error, no duplicate
    registry = CollectorRegistry()
    add_process_collectors(registry)
    add_process_collectors(registry)
    assert [m.name for m in registry.collect()].count("process_cpu_seconds") == 1
