"""Where chains end: smartspec's choice of k by position alone against by the distance from the last miss.

For each prompt of `bench.serving`'s workloads (`--requests`, seed 0), the embedded target greedily
continues it (`--max-tokens`, EOS ignored as in the benchmark) and the embedded draft, fed that text,
marks every token it would have missed (its greedy next token differs). A chain started at any token is
then accepted up to the first miss at or after it: the draft's context is the committed text either way.
Each workload's prompts are then served one after another at batch 1 by a fresh smartspec policy, with
its per-request acceptance by distance from the last miss (scheduler_svc/policy/chain_calibration.py) and
without it (positions only), and by fixed k, every step timed by a linear cost model (the coefficients
of each row) that the policy is given as the truth and does not refit. So the times are the cost
model's, not measured: the replay isolates the choice of k from the machine's noise, on the models'
real misses. The serving benchmark measures the stack.

    .venv/bin/python bench/chain_phase.py --out docs/bench/chain_phase.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: `bench` is a folder of the repository, not installed
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import made_with, write_lines
from scheduler_svc.policy.cost_model import StepShape
from scheduler_svc.types import StepRecord, ProposerSpec, RequestOutcome, RequestView
from scheduler_svc.policy.smartspec import SmartSpecPolicy

CONTEXT = 150  # tokens of context the cost model charges (a prompt of 100-200 tokens)
# (verifier: 1, batch, tokens, context; draft: 1, requests, tokens, passes) in ms. "fitted here": the
# smartspec cost model's fit on the development machine after serving 12 code prompts (the scheduler's own
# overhead folded into the verifier's terms); then the same with each side made twice as costly.
COSTS = {
    "fitted here": ((6.7, 0.5, 0.22, 0.003), (1.6, 0.0, 0.064, 0.83)),
    "draft x2": ((6.7, 0.5, 0.22, 0.003), (3.2, 0.0, 0.128, 1.66)),
    "verifier x2": ((13.4, 1.0, 0.44, 0.006), (1.6, 0.0, 0.064, 0.83)),
}


def step_ms(costs: tuple[Sequence[float], Sequence[float]], ks: Sequence[int], context: int) -> float:
    """The cost model's time of a step with these draft chains (one per request, 0: none) over `context`
    tokens: one verifier forward over the batch, one draft call if anyone speculates (its passes: the
    longest chain). chain_phase.py's steps are batches of one; bench/batch_replay.py's are batches."""
    return sum(step_parts(costs, ks, context))


def step_parts(costs: tuple[Sequence[float], Sequence[float]], ks: Sequence[int], context: int) -> tuple[float, float]:
    """step_ms's two parts: (the verifier's ms, the draft's ms; 0 when nobody speculates)."""
    verify, draft = costs
    verify_ms = float(np.dot(verify, (1, len(ks), sum(k + 1 for k in ks), context)))
    chains = [k for k in ks if k > 0]
    if not chains:
        return verify_ms, 0.0
    shape = StepShape(len(ks), sum(k + 1 for k in ks), context, {"draft": len(chains)},
                      {"draft": sum(chains)}, {"draft": max(chains)})
    # The replays' drafts read every prompt before the first step: no catch-up term (d4).
    return verify_ms, float(np.dot(draft, shape.proposer_features("draft")[:len(draft)]))


def accepted_run(misses: Sequence[bool], start: int, k: int) -> int:
    """Candidates a chain of k from token `start` gets accepted: up to the draft's first miss (the draft's
    context is the committed text either way), and no further than the text."""
    accepted = 0
    while accepted < k and start + accepted < len(misses) and not misses[start + accepted]:
        accepted += 1
    return accepted


def make_policy(costs: tuple[Sequence[float], Sequence[float]], by_age: bool, max_k: int = 8,
                learn_costs: bool = False) -> SmartSpecPolicy:
    """smartspec over the draft alone, its cost model set to `costs` and kept there (or, with
    learn_costs, seeded there and fitted on the steps it observes, as when serving)."""
    policy = SmartSpecPolicy(["draft"], max_k=max_k)
    policy.bind_proposers({"draft": ProposerSpec("draft", max_k)})
    policy.cost_model.verify.reseed(costs[0])
    policy.cost_model.overhead.reseed((0.0, 0.0, 0.0))
    policy.cost_model.proposer("draft").reseed(costs[1])
    if not learn_costs:
        policy._observe_costs = lambda *args: None  # the cost model is the truth here: only k is chosen
    if not by_age:
        policy.calibration = None
    return policy


def replay(misses: Sequence[bool], costs, policy: SmartSpecPolicy | None = None, fixed_k: int = 0,
           request_id: str = "r") -> float:
    """Cost-model ms to commit len(misses) tokens, k chosen by `policy` (or fixed_k without one)."""
    position, ms = 0, 0.0
    view = RequestView(request_id=request_id, proposer="draft", context_len=CONTEXT, max_k=1 << 30)
    while position < len(misses):
        k = policy.plan([view])[request_id].k if policy is not None else fixed_k
        accepted = accepted_run(misses, position, k)
        ms += step_ms(costs, [k], CONTEXT)
        if policy is not None:
            policy.observe([RequestOutcome(request_id, "draft" if k else None, k, k, accepted,
                                           committed=tuple(range(accepted + 1)))],
                           StepRecord(step_id=0, start_s=0.0, wall_ms=ms, verify_total_ms=ms))
        position += accepted + 1
    return ms


def draft_misses(target, draft, prompt: list[int], max_tokens: int) -> list[bool]:
    """Whether the draft's greedy next token misses each of the target's greedy continuation's tokens."""
    import torch

    with torch.no_grad():
        out = target.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                              do_sample=False)
        text = out[0, len(prompt):]
        logits = draft(out).logits[0, len(prompt) - 1:-1]
    return (logits.argmax(-1) != text).tolist()


def main() -> int:
    from transformers import AutoModelForCausalLM

    from bench.serving import WORKLOADS, _tokenizer
    from specdec.model.checkpoint import CODE_DRAFT, CODE_TARGET

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tokenizer = _tokenizer()
    target = AutoModelForCausalLM.from_pretrained(str(CODE_TARGET), dtype="float32").eval()
    draft = AutoModelForCausalLM.from_pretrained(str(CODE_DRAFT), dtype="float32").eval()
    longest = max(args.max_tokens)
    texts = {workload: [draft_misses(target, draft, tokenizer.encode(text).ids, longest)
                        for text in make(args.requests, 0)] for workload, make in WORKLOADS.items()}
    lines = [
        "# Where chains end: choosing k by the distance from the last miss",
        "",
        (f"The draft's misses on the target's greedy text ({args.requests} prompts per workload, seed 0), "
         "served at batch 1 by smartspec with and without its per-request acceptance by distance from the "
         "last miss, and by fixed k. Mean ms per request **from a linear cost model, not measured** "
         "(see the module docstring of bench/chain_phase.py). Made with:"),
        "",
        made_with("bench/chain_phase.py"),
        "",
        ("| workload | tokens | costs | draft misses | fixed:1 | fixed:3 | fixed:5 | positions only | by age "
         "| positions / best fixed | by age / best fixed |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, all_misses in texts.items():
        for tokens in args.max_tokens:
            misses = [m[:tokens] for m in all_misses]
            rate = sum(map(sum, misses)) / sum(map(len, misses))
            for label, costs in COSTS.items():
                fixed = {k: float(np.mean([replay(m, costs, fixed_k=k) for m in misses])) for k in (1, 3, 5)}
                chosen = {}
                for by_age in (False, True):
                    policy = make_policy(costs, by_age)  # one policy serves the prompts in turn: its prior learns
                    chosen[by_age] = float(np.mean([replay(m, costs, policy, request_id=f"r{i}")
                                                    for i, m in enumerate(misses)]))
                best = min(fixed.values())
                lines.append(
                    f"| {workload} | {tokens} | {label} | {rate:.0%} | {fixed[1]:.0f} | {fixed[3]:.0f} | "
                    f"{fixed[5]:.0f} | {chosen[False]:.0f} | {chosen[True]:.0f} | {chosen[False] / best:.3f}x | "
                    f"{chosen[True] / best:.3f}x |")
    return report(lines, args.out)


def report(lines: Sequence[str], out: Path | None) -> int:
    """Print a report's lines followed by the cost models it was timed by, and write them to `out` if given
    (this script's and bench/batch_replay.py's)."""
    legend = "Cost models (ms; verifier: 1, batch, tokens, context; draft: 1, requests, tokens, passes):"
    lines = [*lines, "", legend, ""]
    lines += [f"- {label}: verifier {costs[0]}, draft {costs[1]}" for label, costs in COSTS.items()]
    return write_lines(lines, out)


if __name__ == "__main__":
    sys.exit(main())
