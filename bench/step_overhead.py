"""Per-step overhead of the engine: step wall time minus the model forward times the services report.

The verifier and the proposers run as their own processes (as in production); the scheduler runs in
this process so that its step records (scheduler_svc.engine.StepRecord) can be read. For each policy
(`--policies`: `fixed` at `--k`, and `smartspec`, which plans every step and proposes with the free
prompt lookup before its plan), batch 1 and batch 8 greedy requests are kept running at once and the
steady-state steps (every request of the batch decoding) are summarised:

    overhead = wall - (verifier forward + slowest proposer forward)

which holds gRPC round trips, (de)serialisation, scheduling, verification rules, detokenization and
the proposers' own CPU work (prompt lookup has no forward at all).

    python -m bench.step_overhead                    # prints the table (the one in docs/benchmarks.md)
    python -m bench.step_overhead --out overhead.md  # and writes it as markdown, the rows in overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from scheduler_svc.config import ProposerAddress, SchedulerConfig
from scheduler_svc.server import start_server
from specdec.model.checkpoint import CODE_DRAFT, CODE_TARGET
from specdec.ops.launcher import Stack, free_ports, local_specs
from specdec_client import AsyncClient

PROMPT = (
    "class Node:\n    def __init__(self, key, value):\n        self.key = key\n        self.value = value\n"
    "        self.next = None\n\n    def __repr__(self):\n        return f'Node({self.key!r}, {self.value!r})'\n\n"
)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_case(args, addresses: dict[str, str], policy: str, proposer: str, batch: int) -> dict:
    config = SchedulerConfig(
        verifier=addresses["verifier"],
        proposers=tuple(ProposerAddress(k, addresses[f"proposer-{k}"]) for k in ("ngram", "draft")),
        port=0,
        policy=policy,
        k=args.k,
        log_level="WARNING",
    )
    server = await start_server(config)
    try:
        await server.connect_task
        engine = server.scheduler.engine
        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=600) as client:
            await client.generate(PROMPT, max_tokens=8, proposer=proposer)  # warm-up
            first = len(engine.step_records)
            await asyncio.gather(*(
                client.generate(PROMPT, max_tokens=args.max_tokens, proposer=proposer, ignore_eos=True)
                for _ in range(batch)
            ))
        records = [r for r in list(engine.step_records)[first:] if r.batch_size == batch and r.admitted == 0]
    finally:
        await server.stop(1.0)
    overhead = [r.overhead_ms for r in records]
    return {
        "policy": policy,
        "proposer": proposer,
        "batch": batch,
        "steps": len(records),
        "wall_ms_median": statistics.median(r.wall_ms for r in records),
        "verify_forward_ms_median": statistics.median(r.verify_forward_ms for r in records),
        # The verifier's whole handler; wall minus this is the scheduler's own time plus the RPC.
        "verify_total_ms_median": statistics.median(r.verify_total_ms for r in records),
        "propose_wall_ms_median": statistics.median(r.propose_wall_ms for r in records),
        "propose_forward_ms_median": statistics.median(max(r.propose_forward_ms.values(), default=0.0)
                                                       for r in records),
        "free_propose_wall_ms_median": statistics.median(r.free_propose_wall_ms for r in records),
        "plan_ms_median": statistics.median(r.plan_ms for r in records),
        "overhead_ms_median": statistics.median(overhead),
        "overhead_ms_p90": percentile(overhead, 0.9),
        "tokens_per_step": sum(r.committed for r in records) / len(records) / batch,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.step_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(CODE_TARGET))
    p.add_argument("--draft-model", default=str(CODE_DRAFT))
    p.add_argument("--k", type=int, default=3, help="the fixed policy's k (smartspec chooses up to 8)")
    p.add_argument("--policies", default="fixed,smartspec", help="comma-separated scheduler policies")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    specs = local_specs(free_ports(1)[0], ("ngram", "draft"), model=args.model, draft_model=args.draft_model)
    rows = []
    with Stack(specs[:-1], grace_s=5) as stack:
        addresses = {spec.name: spec.address for spec in stack.specs}
        for policy in args.policies.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for proposer in ("none", "ngram", "draft"):
                    rows.append(asyncio.run(run_case(args, addresses, policy, proposer, batch)))
                    print(json.dumps(rows[-1]), flush=True)

    table = [
        ("| policy | proposer | batch | steps | step wall ms | verifier forward ms | verifier handler ms | "
        "free propose ms | plan ms | propose phase ms | proposer forward ms | overhead ms (median) | "
        "overhead ms (p90) | tokens per request-step |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['policy']} | {r['proposer']} | {r['batch']} | {r['steps']} | {r['wall_ms_median']:.2f} | "
            f"{r['verify_forward_ms_median']:.2f} | {r['verify_total_ms_median']:.2f} | "
            f"{r['free_propose_wall_ms_median']:.2f} | {r['plan_ms_median']:.2f} | {r['propose_wall_ms_median']:.2f} | "
            f"{r['propose_forward_ms_median']:.2f} | "
            f"{r['overhead_ms_median']:.2f} | {r['overhead_ms_p90']:.2f} | {r['tokens_per_step']:.2f} |"
        )
    print("\n".join(table))
    if args.out:
        text = [
            "# Per-step overhead",
            "",
            ("Step wall time minus the model forward times reported by the verifier and the proposers "
            f"(medians over the steady-state steps of each run; greedy, `fixed` at k={args.k}, `smartspec` choosing k "
            f"per step, {args.max_tokens} tokens per request, embedded models on this machine's CPU)."),
            "",
            "Columns are medians; the verifier handler is its whole Verify call as it measures it, the propose",
            "phase is the engine's wait for all proposers (the RPC included); free propose is smartspec's call to",
            "prompt lookup before it plans, plan its plan() call. The rest of the step is the scheduler's own work",
            "(planning, commit, detokenization, streaming, the policy's bookkeeping) and the Verify round trip.",
            "",
            "Made with:",
            "",
            "    " + " ".join(["python -m bench.step_overhead", *sys.argv[1:]]),
            "",
            *table,
            "",
        ]
        args.out.write_text("\n".join(text))
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
