"""Serving benchmark: latency and goodput of the whole stack under Poisson arrivals, per speculation policy.

For every policy a scheduler is started (the verifier and the proposers run once for the whole sweep), and
for every (workload, proposer, rate) the same seeded Poisson trace of `--requests` requests is replayed
against it through the client SDK: each request is sent at its arrival offset, greedy, `--max-tokens`
tokens (EOS ignored so every request asks for the same work). Per run it reports mean/p50/p99 client-side
latency, mean time to first token (server-side, from the request's stats), mean time per output token,
goodput (generated tokens per wall second of the run), acceptance rate and the mean speculation length
(proposed tokens per request-step).

Workloads: `code` cuts prompts from the held-out standard-library files (never trained on); `copy` builds
prompts whose natural continuation repeats a span of the prompt. Proposers: `ngram` and `draft` pin the
request's proposer, `both` leaves the choice to the scheduler with both proposers configured.

    .venv/bin/specdec bench --out docs/bench                       # the whole sweep (hours on a 2-core CPU)
    .venv/bin/python bench/serving.py --rates 2 --policies none,smartspec --requests 8

Writes serving.json (every row), serving.md (a table) and one PNG per (workload, proposer) of mean latency
against arrival rate, one line per policy.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILE = REPO_ROOT / "models" / "tokenizer" / "tokenizer.json"

DEFAULT_RATES = "0.5,2,8"
DEFAULT_POLICIES = "none,fixed:1,fixed:3,fixed:5,smartspec,batch-uniform"
DEFAULT_PROPOSERS = "ngram,draft,both"
DEFAULT_WORKLOADS = "code,copy"
# The proposer a request names for each proposer label ("" = the scheduler's choice).
PROPOSER_LABELS = {"ngram": "ngram", "draft": "draft", "both": ""}
# The proposer services each label needs.
PROPOSER_KINDS_OF_LABEL = {"ngram": ("ngram",), "draft": ("draft",), "both": ("ngram", "draft")}
PROMPT_TOKENS = (100, 200)  # every prompt's length in tokens lies in this range
DEFAULT_K = 3  # --k given to the scheduler for policies other than fixed:N


# ---------------------------------------------------------------------------------------------------------
# Workloads


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_FILE))


def held_out_texts() -> list[tuple[str, str]]:
    """(relative path, text) of the held-out standard-library files of scripts/train_models.py."""
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    from train_models import HELD_OUT_FILES, stdlib_root

    root = stdlib_root()
    return [(rel, (root / rel).read_text(encoding="utf-8", errors="replace")) for rel in HELD_OUT_FILES]


def _count(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text).ids)


def _snippet(rng: random.Random, lines: list[str], tokenizer, low: int, high: int) -> str | None:
    """Whole consecutive lines from a random start whose token count lies in [low, high], or None."""
    start = rng.randrange(len(lines))
    while start < len(lines) and not lines[start].strip():
        start += 1
    text = ""
    for line in lines[start:]:
        candidate = text + line
        n = _count(tokenizer, candidate)
        if n > high:
            break
        text = candidate
        if n >= low and rng.random() < 0.25:
            return text
    return text if low <= _count(tokenizer, text) <= high else None


def code_completion_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts of whole consecutive lines of the held-out stdlib files, 100-200 tokens each; the model
    completes the code that follows. Deterministic for a seed (and a Python version)."""
    rng = random.Random(seed)
    tokenizer = _tokenizer()
    files = [text.splitlines(keepends=True) for _, text in held_out_texts()]
    prompts: list[str] = []
    while len(prompts) < n:
        lines = rng.choice(files)
        text = _snippet(rng, lines, tokenizer, *PROMPT_TOKENS)
        if text is not None:
            prompts.append(text)
    return prompts


FIELD_NAMES = ("name", "size", "count", "offset", "width", "height", "key", "value", "parent", "label",
               "weight", "index", "start", "end", "mode", "owner", "path", "limit", "depth", "color")


def _record_class(rng: random.Random) -> str:
    """A class with one repeated method pattern per field, ending where the next repetition starts."""
    fields = rng.sample(FIELD_NAMES, rng.randint(5, 7))
    cls = "".join(part.capitalize() for part in rng.sample(("node", "entry", "item", "record", "spec"), 2))
    out = [f"class {cls}:\n", f"    def __init__(self, {', '.join(fields)}):\n"]
    out += [f"        self._{f} = {f}\n" for f in fields]
    for f in fields[:-1]:
        out += ["\n", "    @property\n", f"    def {f}(self):\n", f"        return self._{f}\n"]
    out += ["\n", "    @property\n", "    def"]
    return "".join(out)


def copy_heavy_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` prompts whose natural continuation copies a span of the prompt, 100-200 tokens each. Even
    indices: a held-out code snippet, a blank line, then its first lines again (the rest of the snippet is
    the natural continuation); odd indices: a class repeating one method pattern per field, cut where the
    next repetition begins."""
    rng = random.Random(seed)
    tokenizer = _tokenizer()
    files = [text.splitlines(keepends=True) for _, text in held_out_texts()]
    prompts: list[str] = []
    while len(prompts) < n:
        if len(prompts) % 2:
            text = _record_class(rng)
            if PROMPT_TOKENS[0] <= _count(tokenizer, text) <= PROMPT_TOKENS[1]:
                prompts.append(text)
            continue
        snippet = _snippet(rng, rng.choice(files), tokenizer, 60, 120)
        if snippet is None:
            continue
        lines = snippet.splitlines(keepends=True)
        if len(lines) < 4:
            continue
        head = "".join(lines[:max(2, len(lines) // 3)])
        text = snippet + "\n\n" + head
        if PROMPT_TOKENS[0] <= _count(tokenizer, text) <= PROMPT_TOKENS[1]:
            prompts.append(text)
    return prompts


WORKLOADS = {"code": code_completion_prompts, "copy": copy_heavy_prompts}


# ---------------------------------------------------------------------------------------------------------
# Arrivals, replay and summary


def poisson_trace(rate_per_s: float, n_requests: int, seed: int = 0) -> list[float]:
    """Arrival offsets in seconds (the first at 0) of a Poisson process of `rate_per_s` requests/s."""
    if rate_per_s <= 0:
        raise ValueError(f"rate must be > 0, got {rate_per_s}")
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for i in range(n_requests):
        if i:
            t += rng.expovariate(rate_per_s)
        offsets.append(t)
    return offsets


@dataclass
class RequestResult:
    """One replayed request. Times in ms; offsets in s from the start of the replay."""

    index: int
    arrival_s: float  # when the trace said to send it
    sent_s: float  # when it was sent
    done_s: float  # when its result arrived
    latency_ms: float  # client-side wall, send to result
    ttft_ms: float = 0.0  # time to first token, server-side
    prompt_tokens: int = 0
    completion_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    steps: int = 0
    error: str | None = None


async def replay(address: str, trace: list[float], prompts: list[str], proposer: str, max_tokens: int,
                 *, ignore_eos: bool = True, timeout: float = 600.0) -> list[RequestResult]:
    """Send prompts[i] at trace[i] seconds after the start (greedy) and record each result; a failed
    request is recorded with its error instead of raising."""
    from specdec_client import AsyncClient

    if len(prompts) < len(trace):
        raise ValueError(f"{len(trace)} arrivals but only {len(prompts)} prompts")
    async with AsyncClient(address, timeout=timeout) as client:
        began = time.perf_counter()

        async def one(i: int, arrival: float) -> RequestResult:
            delay = arrival - (time.perf_counter() - began)
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            try:
                result = await client.generate(prompts[i], max_tokens=max_tokens, temperature=0.0,
                                               proposer=proposer, ignore_eos=ignore_eos)
            except Exception as exc:  # recorded: one failed request must not lose the run
                done = time.perf_counter()
                return RequestResult(i, arrival, sent - began, done - began, (done - sent) * 1000,
                                     error=f"{type(exc).__name__}: {exc}")
            done = time.perf_counter()
            s = result.stats
            return RequestResult(i, arrival, sent - began, done - began, (done - sent) * 1000,
                                 ttft_ms=s.time_to_first_token_ms, prompt_tokens=s.prompt_tokens,
                                 completion_tokens=len(result.token_ids), proposed=s.proposed,
                                 accepted=s.accepted, steps=s.steps)

        return list(await asyncio.gather(*(one(i, arrival) for i, arrival in enumerate(trace))))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Figures of one run over its successful requests (errors are only counted).

    ms_per_output_token: mean over requests of latency / generated tokens; goodput_tok_s: all generated
    tokens / wall_s; acceptance_rate: accepted / proposed; mean_k: proposed / request-steps.
    """
    ok = [r for r in results if r.error is None]
    latencies = [r.latency_ms for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    proposed = sum(r.proposed for r in ok)
    accepted = sum(r.accepted for r in ok)
    steps = sum(r.steps for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall_s,
        "mean_latency_ms": _mean(latencies),
        "p50_latency_ms": percentile(latencies, 50),
        "p99_latency_ms": percentile(latencies, 99),
        "mean_ttft_ms": _mean([r.ttft_ms for r in ok]),
        "ms_per_output_token": _mean([r.latency_ms / r.completion_tokens for r in ok if r.completion_tokens]),
        "generated_tokens": tokens,
        "goodput_tok_s": tokens / wall_s if wall_s > 0 else math.nan,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "mean_k": proposed / steps if steps else 0.0,
    }


# ---------------------------------------------------------------------------------------------------------
# Sweep


@dataclass(frozen=True)
class RunConfig:
    """One benchmark run: a scheduler policy (k for fixed), a proposer label, a workload and a rate."""

    policy: str  # scheduler policy: none, fixed, smartspec, batch-uniform, ...
    proposer: str  # "ngram", "draft" or "both" (the request names no proposer, both are configured)
    workload: str  # "code" or "copy"
    rate: float  # requests per second
    k: int = DEFAULT_K  # --k of the scheduler (the speculation length of fixed)

    @property
    def policy_label(self) -> str:
        return f"{self.policy}:{self.k}" if self.policy == "fixed" else self.policy

    @property
    def request_proposer(self) -> str:
        return PROPOSER_LABELS[self.proposer]


def parse_policy(label: str) -> tuple[str, int]:
    """'fixed:3' -> ('fixed', 3); 'smartspec' -> ('smartspec', DEFAULT_K)."""
    name, _, k = label.partition(":")
    return name, int(k) if k else DEFAULT_K


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def plan(args: argparse.Namespace) -> list[RunConfig]:
    """Every run of the sweep, grouped by policy (one scheduler per policy)."""
    rates = [float(r) for r in _split(args.rates)]
    proposers, workloads = _split(args.proposers), _split(args.workloads)
    for p in proposers:
        if p not in PROPOSER_LABELS:
            raise ValueError(f"unknown proposer {p!r} (choose from {', '.join(PROPOSER_LABELS)})")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    if any(r <= 0 for r in rates):
        raise ValueError("rates must be > 0")
    runs = []
    for label in _split(args.policies):
        policy, k = parse_policy(label)
        for workload in workloads:
            for proposer in proposers:
                for rate in rates:
                    runs.append(RunConfig(policy, proposer, workload, rate, k))
    return runs


def _scheduler_stack(scheduler_spec, policy: str, k: int, startup_timeout: float):
    from specdec.launcher import Stack

    args = list(scheduler_spec.args)
    args[args.index("--policy") + 1] = policy
    args[args.index("--k") + 1] = str(k)
    spec = dataclasses.replace(scheduler_spec, args=args, depends_on=[])
    return Stack([spec], startup_timeout_s=startup_timeout, grace_s=5, echo=None)


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Start the backends once and a scheduler per policy, replay every run; returns one row per run."""
    from scheduler_svc.config import POLICIES
    from specdec.launcher import Stack, free_ports, local_specs

    runs = plan(args)
    for run in runs:
        if run.policy not in POLICIES:
            raise ValueError(f"unknown policy {run.policy!r} (choose from {', '.join(POLICIES)})")
    kinds = [kind for kind in ("ngram", "draft")
             if any(kind in PROPOSER_KINDS_OF_LABEL[run.proposer] for run in runs)]
    prompts = {w: WORKLOADS[w](args.requests, args.seed) for w in {run.workload for run in runs}}
    env = {"SPECDEC_TORCH_THREADS": str(args.service_threads)} if args.service_threads else None
    kwargs = {"model": args.model} if args.model else {}
    if args.draft_model:
        kwargs["draft_model"] = args.draft_model
    specs = local_specs(free_ports(1)[0], kinds, env=env, **kwargs)
    rows: list[dict] = []
    with Stack(specs[:-1], startup_timeout_s=args.startup_timeout, grace_s=5, echo=None):
        done = 0
        for policy_label in dict.fromkeys(run.policy_label for run in runs):
            group = [run for run in runs if run.policy_label == policy_label]
            with _scheduler_stack(specs[-1], group[0].policy, group[0].k, args.startup_timeout) as scheduler:
                address = scheduler.specs[0].address
                # Warm-up: the first request of a fresh scheduler pays one-off costs.
                asyncio.run(replay(address, [0.0], prompts[group[0].workload][:1], "", 4))
                for run in group:
                    done += 1
                    print(f"[{done}/{len(runs)}] policy={run.policy_label} workload={run.workload} "
                          f"proposer={run.proposer} rate={run.rate:g}/s", file=sys.stderr, flush=True)
                    trace = poisson_trace(run.rate, args.requests, args.seed)
                    results = asyncio.run(replay(address, trace, prompts[run.workload], run.request_proposer,
                                                 args.max_tokens, timeout=args.timeout))
                    wall = max((r.done_s for r in results), default=0.0)
                    rows.append({"policy": run.policy_label, "proposer": run.proposer, "workload": run.workload,
                                 "rate": run.rate, "max_tokens": args.max_tokens, **summarize(results, wall)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Output

TABLE_COLUMNS = [
    ("workload", "workload", "{}"), ("proposer", "proposer", "{}"), ("policy", "policy", "{}"),
    ("rate", "rate (req/s)", "{:g}"), ("requests", "requests", "{}"), ("errors", "errors", "{}"),
    ("mean_latency_ms", "mean latency (ms)", "{:.0f}"), ("p50_latency_ms", "p50 (ms)", "{:.0f}"),
    ("p99_latency_ms", "p99 (ms)", "{:.0f}"), ("mean_ttft_ms", "mean TTFT (ms)", "{:.0f}"),
    ("ms_per_output_token", "ms/token", "{:.1f}"), ("goodput_tok_s", "goodput (tok/s)", "{:.1f}"),
    ("acceptance_rate", "acceptance", "{:.1%}"), ("mean_k", "mean k", "{:.2f}"),
]


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + " --- |" * len(TABLE_COLUMNS)]
    for row in sorted(rows, key=lambda r: (r["workload"], r["proposer"], r["policy"], r["rate"])):
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot_latency(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per (workload, proposer): mean latency against rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload, proposer in dict.fromkeys((r["workload"], r["proposer"]) for r in rows):
        group = [r for r in rows if r["workload"] == workload and r["proposer"] == proposer]
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in group):
            points = sorted((r["rate"], r["mean_latency_ms"]) for r in group if r["policy"] == policy)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        ax.set_xscale("log")
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel("mean latency (ms)")
        ax.set_title(f"workload {workload}, proposer {proposer}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out / f"serving_latency_{workload}_{proposer}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(rows: list[dict], out: Path, args: argparse.Namespace | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "command")} if args is not None else {}
    json_path, md_path = out / "serving.json", out / "serving.md"
    json_path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    header = "# Serving benchmark\n\nMade by `specdec bench` (bench/serving.py)"
    if settings:
        header += f" with {', '.join(f'{k}={v}' for k, v in settings.items())}"
    md_path.write_text(header + ".\n\n" + markdown_table(rows))
    return [json_path, md_path, *plot_latency(rows, out)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"arrival rates in requests/s (default {DEFAULT_RATES})")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"policies, fixed:K for fixed with k=K (default {DEFAULT_POLICIES})")
    parser.add_argument("--proposers", default=DEFAULT_PROPOSERS,
                        help=f"ngram, draft, both (= the scheduler's choice) (default {DEFAULT_PROPOSERS})")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"code, copy (default {DEFAULT_WORKLOADS})")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival traces")
    parser.add_argument("--out", default="docs/bench", help="output folder (default docs/bench)")
    parser.add_argument("--model", help="target checkpoint folder (default: the embedded models/code-target)")
    parser.add_argument("--draft-model", help="draft checkpoint folder (default: the embedded models/code-draft)")
    parser.add_argument("--service-threads", type=int, default=0,
                        help="torch threads per service (SPECDEC_TORCH_THREADS), 0 = their default")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each request in seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each service")


def main(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.max_tokens < 1:
        raise ValueError("--requests and --max-tokens must be >= 1")
    plan(args)  # fails on bad flags before anything starts
    rows = run_sweep(args)
    for path in write_outputs(rows, Path(args.out), args):
        print(f"specdec bench: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    parser = argparse.ArgumentParser(description="Serving benchmark of the specdec stack.")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
