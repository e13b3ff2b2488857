"""The serving benchmark's arrival traces replayed through the policies on the models' real draft misses.

bench/chain_phase.py serves prompts one at a time; this replays them as the serving benchmark does, in
batches: requests arrive on `bench.serving`'s seeded Poisson traces (`--rates`, `--seeds` traces each),
join the batch at the end of the step they arrived in, and leave once they have `--max-tokens` tokens.
Every step the policy (smartspec, or fixed k) chooses each running request's k; a chain is accepted up
to the draft's first miss on the target's greedy text (computed as in chain_phase.py), and the step
takes the time of a linear cost model (chain_phase.COSTS) that smartspec is given as the truth and does
not refit, plus ADMIT_MS for each request admitted at its start. The policy is not told of arrivals (its
arrival weighting, goodput.py's "Arrivals", stays off). So the latencies are the cost model's,
**not measured**: the replay shows what the choice of k costs when the policy's cost model is right,
apart from the machine's noise and from any error in that model. The serving benchmark measures the stack.

    .venv/bin/python bench/batch_replay.py --out docs/bench/batch_replay.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.chain_phase import CONTEXT, COSTS, accepted_run, draft_misses, make_policy, report, step_parts
from bench.report import made_with
from bench.serving import poisson_trace
from scheduler_svc.types import StepRecord, RequestOutcome, RequestView
from scheduler_svc.policy.smartspec import SmartSpecPolicy

# A step that admits a request (the verifier's prefill of its prompt, the stream's set-up) took about this
# much longer than the cost model's prediction for the step without it: the median excess over steps
# with one admission was 39-40 ms, against 3.6-3.7 ms over steps without, in an in-process replay of the
# benchmark's copy and code traces at 16 req/s on the development machine.
ADMIT_MS = 35.0
FIXED_KS = (1, 2, 3, 4, 5)


def replay(misses: Sequence[Sequence[bool]], arrivals_s: Sequence[float], costs, max_tokens: int,
           policy: SmartSpecPolicy | None = None, fixed_k: int = 0, tag: str = "") -> list[float | None]:
    """Each request's latency in ms (cost-model time from its arrival to its last token).

    Request i arrives at arrivals_s[i] and its text's draft misses are misses[i]; k is chosen by
    `policy` (or fixed_k without one), capped so that no step commits past max_tokens.
    """
    n = len(arrivals_s)
    committed = [0] * n
    latency: list[float | None] = [None] * n
    running: list[int] = []
    waiting = sorted(range(n), key=lambda i: arrivals_s[i])
    now, steps = 0.0, 0
    while waiting or running:
        if not running and arrivals_s[waiting[0]] * 1e3 > now:
            now = arrivals_s[waiting[0]] * 1e3  # idle until the next arrival
        admitted = [i for i in waiting if arrivals_s[i] * 1e3 <= now]
        waiting = [i for i in waiting if i not in admitted]
        running += admitted
        views = [RequestView(f"{tag}r{i}", "draft", CONTEXT + committed[i], max_k=max_tokens - committed[i] - 1)
                 for i in running]
        if policy is not None:
            plans = policy.plan(views)
            ks = [plans[v.request_id].k for v in views]
        else:
            ks = [min(fixed_k, v.max_k) for v in views]
        verify_ms, draft_ms = step_parts(costs, ks, sum(v.context_len for v in views))
        ms = ADMIT_MS * len(admitted) + verify_ms + draft_ms
        outcomes = []
        for i, k in zip(running, ks):
            accepted = accepted_run(misses[i], committed[i], k)
            committed[i] += accepted + 1
            outcomes.append(RequestOutcome(f"{tag}r{i}", "draft" if k else None, k, k, accepted,
                                           committed=tuple(range(accepted + 1))))
        now += ms
        steps += 1
        if policy is not None:
            # As the engine records a step (a policy that learns its costs fits them on these).
            policy.observe(outcomes, StepRecord(
                step_id=steps, start_s=0.0, wall_ms=ms, batch_size=len(views), admitted=len(admitted),
                verify_total_ms=verify_ms, propose_ms={"draft": draft_ms} if draft_ms else {},
                propose_wall_ms=draft_ms))
        for i in running:
            if committed[i] >= max_tokens:
                latency[i] = now - arrivals_s[i] * 1e3
        running = [i for i in running if committed[i] < max_tokens]
    return latency


def compare(misses, rate: float, seeds: int, costs, max_tokens: int) -> dict[str, float]:
    """Mean latency (ms) over `seeds` traces at `rate` per policy: fixed k, and one smartspec policy serving
    the traces in turn (its acceptance prior learns across them, as over the benchmark's repeats)."""
    traces = [poisson_trace(rate, len(misses), seed) for seed in range(seeds)]
    means = {f"fixed:{k}": statistics.mean(x for t in traces for x in replay(misses, t, costs, max_tokens,
                                                                            fixed_k=k)) for k in FIXED_KS}
    policy = make_policy(costs, by_age=True)
    means["smartspec"] = statistics.mean(x for s, t in enumerate(traces)
                                         for x in replay(misses, t, costs, max_tokens, policy, tag=f"s{s}"))
    return means


def replay_parser(description: str, rates: str) -> argparse.ArgumentParser:
    """The flags of a replay over the benchmark's traces (this script's and bench/policy_time.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rates", default=rates, help="comma-separated requests per second")
    parser.add_argument("--seeds", type=int, default=8, help="arrival traces per rate (seeds 0..N-1)")
    parser.add_argument("--out", type=Path)
    return parser


def workload_misses(requests: int, max_tokens: int) -> dict[str, list[list[bool]]]:
    """Per workload, each of its first `requests` prompts' draft misses on the target's greedy text."""
    from transformers import AutoModelForCausalLM

    from bench.serving import WORKLOADS, _tokenizer
    from specdec.model.checkpoint import CODE_DRAFT, CODE_TARGET

    tokenizer = _tokenizer()
    target = AutoModelForCausalLM.from_pretrained(str(CODE_TARGET), dtype="float32").eval()
    draft = AutoModelForCausalLM.from_pretrained(str(CODE_DRAFT), dtype="float32").eval()
    return {workload: [draft_misses(target, draft, tokenizer.encode(text).ids, max_tokens)
                       for text in make(requests, 0)] for workload, make in WORKLOADS.items()}


def main() -> int:
    args = replay_parser(__doc__.splitlines()[0], "1,4,16,32").parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    texts = workload_misses(args.requests, args.max_tokens)
    fixed_cols = " | ".join(f"fixed:{k}" for k in FIXED_KS)
    lines = [
        "# Batches replayed: the policies on the benchmark's traces, the draft's real misses, a known cost",
        "",
        (f"{args.requests} prompts per workload arriving on the serving benchmark's seeded Poisson traces "
         f"({args.seeds} per rate), {args.max_tokens} tokens each; the draft's misses on the target's greedy "
         "text decide what each chain accepts. Mean ms per request **from a linear cost model (plus "
         f"{ADMIT_MS:.0f} ms per admission), not measured** (see the module docstring of "
         "bench/batch_replay.py): smartspec is given that model as the truth. Made with:"),
        "",
        made_with("bench/batch_replay.py"),
        "",
        f"| workload | req/s | costs | {fixed_cols} | smartspec | smartspec / best fixed |",
        "| --- | --- | --- | " + "--- | " * len(FIXED_KS) + "--- | --- |",
    ]
    ratios = []
    for workload, misses in texts.items():
        for rate in rates:
            for label, costs in COSTS.items():
                means = compare(misses, rate, args.seeds, costs, args.max_tokens)
                best = min(means[f"fixed:{k}"] for k in FIXED_KS)
                ratios.append(means["smartspec"] / best)
                cells = " | ".join(f"{means[f'fixed:{k}']:.0f}" for k in FIXED_KS)
                lines.append(f"| {workload} | {rate:g} | {label} | {cells} | {means['smartspec']:.0f} | "
                             f"{ratios[-1]:.3f}x |")
    lines += ["", (f"smartspec / best fixed k: {min(ratios):.3f}x to {max(ratios):.3f}x over the {len(ratios)} "
                   f"rows, {sum(r <= 1.05 for r in ratios)} of them within 1.05x.")]
    return report(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
