"""Serving benchmark: latency and goodput of the whole stack under Poisson arrivals, per speculation policy,
against Hugging Face transformers serving the same models.

The verifier and the proposers run once for the whole sweep, with one scheduler per policy beside them
(each on its own port, started one after the other). For every (workload, proposer, rate) the same seeded
Poisson trace of `--requests` requests is replayed through the client SDK against every policy's
scheduler, back to back (so that whatever else the machine does at the time weighs on every policy
compared there): each request is sent at its arrival offset, greedy, `--max-tokens` tokens (EOS ignored
so every request asks for the same work). `--repeats N` replays the whole sweep N times, rotating the
policies' order each time, and pools the requests of a run's repeats (each repeat's mean latency is kept
in the row as well); `--repeats 3,3,8` gives each rate of `--rates` its own count (the heaviest rate's runs
are short, and past saturation their mean latency is the noisiest). Per run it reports mean/p50/p99 client-side
latency, mean time to first token (server-side, from the request's stats), mean time per output token,
goodput (generated tokens per wall second of the run), acceptance rate, the mean speculation length
(proposed tokens per request-step; a tree's node count for medusa) and accepted tokens per request-step.

Workloads: `code` cuts prompts from the held-out standard-library files (never trained on); `copy` builds
prompts whose natural continuation repeats a span of the prompt. Proposers: `ngram`, `draft` and `medusa`
pin the request's proposer (for medusa, `fixed:N` verifies a tree of up to N nodes); `both` leaves the
choice to the scheduler with the ngram and draft proposers configured. Policy `none` never speculates, so
it runs once per (workload, rate) and its row is repeated for every proposer label, marked "shared": true
with "measured_with" naming the label it ran under (an asterisk in the table). A policy label may add
scheduler flags after "~" (`smartspec~max-k=4`, `smartspec~ema-alpha=0.5`): that policy then runs in a
scheduler of its own with the flags, beside the others and under its own label, to measure one setting.

Peers (`--peers`, bench.hf_peers): after the stack is stopped, so that nothing competes for the CPU,
this process loads the same target and draft with transformers and serves the same prompts on the same
traces one request at a time in arrival order, each waiting for the previous one, its latency counted from
its arrival: `hf-generate` (plain greedy `generate`), `hf-assisted` (`assistant_model` = the draft) and
`hf-prompt-lookup` (`prompt_lookup_num_tokens`, `--peer-lookup-tokens`, default 5 = the stack's largest
k). Torch threads: `--peer-threads`, else `--service-threads`. Each request's service time is measured on
the wall clock and the FIFO queueing laid on the trace (hf_peers.fifo_schedule); TTFT is the time to the
first new token from a streamer, plus the wait. Their rows have proposer `hf` ("peer": true; acceptance and
mean k null for hf-generate) and are drawn, dashed and grey, in every plot of their workload.

    python -m bench.serving --out docs/bench                      # the whole sweep (hours on a 2-core CPU)
    python -m bench.serving --proposers ngram,draft,both,medusa --policies none,fixed:1,fixed:3,fixed:5,\
        fixed:8,fixed:16,smartspec,batch-uniform                 # with the Medusa heads and larger trees
    python -m bench.serving --rates 2 --policies none,smartspec --requests 8 --peers '' --out /tmp/bench
    python -m bench.serving --policies smartspec,smartspec~max-k=4       # a scheduler flag changed

Progress (runs done/total, elapsed, ETA) goes to stderr: one updating line on a terminal, plain lines
otherwise. Writes serving.json (every row, with the settings), serving.md (a table), one PNG per
(workload, proposer) of mean latency against arrival rate (one line per policy, plus the peers), and
summary.md (bench.summary: the policy's targets, PASS/FAIL with their numbers), which is also
printed to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.hf_peers import DEFAULT_LOOKUP_TOKENS, PEERS

PROG = "python -m bench.serving"
REPO_ROOT = Path(__file__).resolve().parents[1]

TOKENIZER_FILE = REPO_ROOT / "models" / "tokenizer" / "tokenizer.json"

DEFAULT_RATES = "0.5,2,8"
DEFAULT_POLICIES = "none,fixed:1,fixed:3,fixed:5,smartspec,batch-uniform"
DEFAULT_PROPOSERS = "ngram,draft,both"
DEFAULT_WORKLOADS = "code,copy"
# The proposer a request names for each proposer label ("" = the scheduler's choice).
PROPOSER_LABELS = {"ngram": "ngram", "draft": "draft", "both": "", "medusa": "medusa"}
# The proposer services each label needs.
PROPOSER_KINDS_OF_LABEL = {"ngram": ("ngram",), "draft": ("draft",), "both": ("ngram", "draft"),
                           "medusa": ("medusa",)}
PROPOSER_KINDS = ("ngram", "draft", "medusa")  # in the order the stack starts them
# The policy that never speculates: the proposer label does not change its run (see plan()).
NO_SPECULATION = "none"
# Hugging Face peers (bench.hf_peers.PEERS): their rows carry this proposer label.
DEFAULT_PEERS = ",".join(PEERS)
PEER_PROPOSER = "hf"
PROMPT_TOKENS = (100, 200)  # every prompt's length in tokens lies in this range
DEFAULT_K = 3  # --k given to the scheduler for policies other than fixed:N


# ---------------------------------------------------------------------------------------------------------
# Workloads


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER_FILE))


def held_out_texts() -> list[tuple[str, str]]:
    """(relative path, text) of the held-out standard-library files (specdec/training/corpus.py)."""
    from specdec.training.corpus import HELD_OUT_FILES, stdlib_root

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
    proposer_steps: Mapping[str, int] = dataclasses.field(default_factory=dict)  # steps each proposer served
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
                                 accepted=s.accepted, steps=s.steps,
                                 proposer_steps={name: c.steps for name, c in s.proposers.items() if c.steps})

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
    tokens / wall_s; acceptance_rate: accepted / proposed; mean_k: proposed / request-steps (a tree
    proposer's k is its node count); mean_accepted_per_step: accepted / request-steps; proposer_share:
    the fraction of request-steps each proposer served: planned with it and answered by it (prompt lookup's
    answer may be empty: no match); the rest planned no speculation.
    """
    ok = [r for r in results if r.error is None]
    latencies = [r.latency_ms for r in ok]
    tokens = sum(r.completion_tokens for r in ok)
    proposed = sum(r.proposed for r in ok)
    accepted = sum(r.accepted for r in ok)
    steps = sum(r.steps for r in ok)
    served: dict[str, int] = {}
    for r in ok:
        for name, n in r.proposer_steps.items():
            served[name] = served.get(name, 0) + n
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
        "mean_accepted_per_step": accepted / steps if steps else 0.0,
        "proposer_share": {name: n / steps for name, n in sorted(served.items())} if steps else {},
    }


# ---------------------------------------------------------------------------------------------------------
# Sweep


@dataclass(frozen=True)
class RunConfig:
    """One benchmark run: a policy (k for fixed) or a Hugging Face peer, a proposer label, a workload and a
    rate."""

    policy: str  # scheduler policy (none, fixed, smartspec, batch-uniform, ...) or a peer (hf-generate, ...)
    proposer: str  # ngram, draft, medusa, both (the request names no proposer, ngram and draft are configured)
    workload: str  # "code" or "copy"
    rate: float  # requests per second
    k: int = DEFAULT_K  # --k of the scheduler (fixed: the chain length; medusa: the tree's node budget)
    # More proposer labels this run's row is reported for (policy none: the proposer changes nothing).
    shared_with: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()  # more scheduler flags, without their dashes (a label's "~" parts)

    @property
    def policy_label(self) -> str:
        label = f"{self.policy}:{self.k}" if self.policy == "fixed" else self.policy
        return "~".join((label, *self.flags))

    @property
    def request_proposer(self) -> str:
        return PROPOSER_LABELS[self.proposer]

    @property
    def is_peer(self) -> bool:
        return self.policy in PEERS

    @property
    def labels(self) -> tuple[str, ...]:
        """Every proposer label this run's row is reported under."""
        return (self.proposer, *self.shared_with)


def parse_policy(label: str) -> tuple[str, int, tuple[str, ...]]:
    """'fixed:3' -> ('fixed', 3, ()); 'smartspec' -> ('smartspec', DEFAULT_K, ());
    'smartspec~max-k=4~ema-alpha=0.5' -> ('smartspec', DEFAULT_K, ('max-k=4', 'ema-alpha=0.5')):
    scheduler flags after "~", so that a policy runs beside itself with a setting changed."""
    policy, *flags = label.split("~")
    name, _, k = policy.partition(":")
    if any(not f or f.startswith("-") for f in flags):
        raise ValueError(f"bad policy {label!r}: write a scheduler flag after '~' without its dashes, "
                         "e.g. smartspec~max-k=4")
    try:
        return name, int(k) if k else DEFAULT_K, tuple(flags)
    except ValueError:
        raise ValueError(f"bad policy {label!r}: the k of fixed:K must be an integer") from None


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def plan(args: argparse.Namespace) -> list[RunConfig]:
    """Every run of the sweep: the stack's runs grouped by policy (one scheduler per policy), then the
    Hugging Face peers' (run in this process once the stack is stopped).

    Policy `none` never speculates, so its run does not depend on the proposer label: it runs once per
    (workload, rate), with the first proposer label, and its row is reported for every label
    (`shared_with`). Peers have no proposer label (PEER_PROPOSER) and run once per (workload, rate).
    """
    rates = [float(r) for r in _split(args.rates)]
    proposers, workloads = _split(args.proposers), _split(args.workloads)
    peers = _split(getattr(args, "peers", ""))
    for p in proposers:
        if p not in PROPOSER_LABELS:
            raise ValueError(f"unknown proposer {p!r} (choose from {', '.join(PROPOSER_LABELS)})")
    for w in workloads:
        if w not in WORKLOADS:
            raise ValueError(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
    from scheduler_svc.config import POLICIES

    for label in _split(args.policies):
        if parse_policy(label)[0] not in POLICIES:
            raise ValueError(f"unknown policy {label!r} (choose from {', '.join(POLICIES)}; fixed:K for fixed)")
    for peer in peers:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r} (choose from {', '.join(PEERS)}, or '' for none)")
    if any(r <= 0 for r in rates):
        raise ValueError("rates must be > 0")
    proposers, peers = list(dict.fromkeys(proposers)), list(dict.fromkeys(peers))
    runs = []
    for label in dict.fromkeys(_split(args.policies)):
        policy, k, flags = parse_policy(label)
        for workload in workloads:
            if policy == NO_SPECULATION and proposers:
                runs += [RunConfig(policy, proposers[0], workload, rate, k, tuple(proposers[1:]), flags)
                         for rate in rates]
                continue
            for proposer in proposers:
                for rate in rates:
                    runs.append(RunConfig(policy, proposer, workload, rate, k, flags=flags))
    for peer in peers:
        for workload in workloads:
            for rate in rates:
                runs.append(RunConfig(peer, PEER_PROPOSER, workload, rate))
    return runs


def _scheduler_stack(scheduler_spec, run: RunConfig, startup_timeout: float, port: int):
    from specdec.ops.launcher import Stack

    args = list(scheduler_spec.args)
    args[args.index("--policy") + 1] = run.policy
    args[args.index("--k") + 1] = str(run.k)
    args[args.index("--port") + 1] = str(port)
    args += [f"--{flag}" for flag in run.flags]
    name = "-".join((scheduler_spec.name, run.policy, str(run.k), *(f.split("=")[0] for f in run.flags)))
    spec = dataclasses.replace(scheduler_spec, args=args, port=port, depends_on=[], name=name)
    return Stack([spec], startup_timeout_s=startup_timeout, grace_s=5, echo=None)


class Progress:
    """Runs done out of the total, elapsed time and an ETA, on stderr: one line rewritten in place when
    stderr is a terminal, one plain line per update otherwise (logs, CI)."""

    def __init__(self, total: int, stream=None, clock=time.monotonic):
        self.total, self.done = total, 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.began = clock()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def line(self, what: str) -> str:
        """The progress line before starting `what`: ETA from the mean time of the runs done so far."""
        elapsed = self.clock() - self.began
        eta = f"{_clock(elapsed / self.done * (self.total - self.done))}" if self.done else "?"
        return f"[{self.done}/{self.total}] elapsed {_clock(elapsed)}, ETA {eta} | {what}"

    def start(self, what: str) -> None:
        """Show that run `what` starts now."""
        self._write(self.line(what))

    def advance(self) -> None:
        """Count one run as done."""
        self.done += 1

    def close(self, what: str = "done") -> None:
        self._write(self.line(what))
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + text)  # back to the line's start, clear it, rewrite
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _repeat_label(repeat: int, repeats: int) -> str:
    """' (repeat i/N)' for the progress line, when the sweep is repeated."""
    return f" (repeat {repeat + 1}/{repeats})" if repeats > 1 else ""


def repeats_per_rate(args: argparse.Namespace) -> dict[float, int]:
    """--repeats as rate -> repeats: one number for every rate, or one per rate in --rates order.

    Heavier rates are cheap to repeat (a run lasts about requests / rate seconds) and need it most: past
    saturation a few per cent of throughput moves the queue, and so the mean latency, several times as much.
    """
    rates = [float(r) for r in _split(args.rates)]
    value = str(getattr(args, "repeats", 1))
    try:
        counts = [int(c) for c in _split(value)]
    except ValueError:
        raise ValueError(f"--repeats must be a number or one per rate, got {value!r}") from None
    if len(counts) == 1:
        counts *= len(rates)
    if len(counts) != len(rates) or any(c < 1 for c in counts):
        raise ValueError(f"--repeats must be one number >= 1 or one per rate ({len(rates)}), got {value!r}")
    return dict(zip(rates, counts))


def _describe(run: RunConfig) -> str:
    proposer = "" if run.is_peer else f" proposer={run.proposer}"
    return f"policy={run.policy_label} workload={run.workload}{proposer} rate={run.rate:g}/s"


def interleave(runs: list[RunConfig], repeats: int | Mapping[float, int] = 1) -> list[tuple[int, RunConfig]]:
    """The order the stack's runs are replayed in: (repeat, run) pairs.

    The runs of one (workload, rate, proposer) - every policy's - are replayed back to back, so that what
    else the machine does at the time weighs on all the policies compared there; each repeat rotates their
    order by one, so that no policy always goes first. `repeats` may differ per rate (repeats_per_rate):
    a rate's extra repeats come in the later rounds of the sweep.
    """
    groups: dict[tuple, list[RunConfig]] = {}
    for run in runs:
        groups.setdefault((run.workload, run.rate, run.proposer), []).append(run)
    counts = repeats if isinstance(repeats, Mapping) else {rate: repeats for _, rate, _ in groups}
    order = []
    for repeat in range(max(counts.values(), default=0)):
        for (_, rate, _), group in groups.items():
            if repeat >= counts[rate]:
                continue
            shift = repeat % len(group)
            order += [(repeat, run) for run in group[shift:] + group[:shift]]
    return order


def pool(repeats: list[tuple[list[RequestResult], float]]) -> dict:
    """The figures of a run over all its repeats' requests ((results, wall_s) per repeat): latencies pooled,
    goodput over the summed wall time; every request's latency by repeat; with more than one repeat, each
    repeat's own mean latency too."""
    figures = summarize([r for results, _ in repeats for r in results], sum(wall for _, wall in repeats))
    figures["repeats"] = len(repeats)
    # Each request's latency (None: failed), repeat by repeat in trace order: the same index is the same
    # prompt and arrival under every policy, so summary.py can compare policies request by request.
    figures["request_latency_ms"] = [[None if r.error is not None else round(r.latency_ms, 1)
                                      for r in sorted(results, key=lambda r: r.index)] for results, _ in repeats]
    if len(repeats) > 1:
        figures["repeat_mean_latency_ms"] = [summarize(results, wall)["mean_latency_ms"]
                                             for results, wall in repeats]
    return figures


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Start the backends and one scheduler per policy (each on its own port, one after the other so that
    their start-up profiles do not overlap), replay every run `--repeats` times in the interleaved order;
    then stop the stack and run the Hugging Face peers in this process. Returns one row per (run, proposer
    label), pooled over the repeats."""
    from specdec.ops.launcher import Stack, free_ports, local_specs

    runs = plan(args)
    repeats = repeats_per_rate(args)
    stack_runs = [run for run in runs if not run.is_peer]
    peer_runs = [run for run in runs if run.is_peer]
    kinds = [kind for kind in PROPOSER_KINDS
             if any(kind in PROPOSER_KINDS_OF_LABEL[label] for run in stack_runs for label in run.labels)]
    prompts = {w: WORKLOADS[w](args.requests, args.seed) for w in {run.workload for run in runs}}
    order = interleave(stack_runs, repeats)
    progress = Progress(len(order) + sum(repeats[run.rate] for run in peer_runs))
    rows: list[dict] = []
    if stack_runs:
        env = {"SPECDEC_TORCH_THREADS": str(args.service_threads)} if args.service_threads else None
        kwargs = {"model": args.model} if args.model else {}
        if args.draft_model:
            kwargs["draft_model"] = args.draft_model
        if getattr(args, "medusa_model", None):
            kwargs["medusa_model"] = args.medusa_model
        specs = local_specs(free_ports(1)[0], kinds, env=env, **kwargs)
        policies = list(dict.fromkeys(run.policy_label for run in stack_runs))
        ports = free_ports(len(policies), exclude=(specs[-1].port,))
        measured: dict[RunConfig, list[tuple[list[RequestResult], float]]] = {run: [] for run in stack_runs}
        progress.start(f"starting the stack ({', '.join(['verifier', *kinds])})")
        with Stack(specs[:-1], startup_timeout_s=args.startup_timeout, grace_s=5, echo=None), \
                contextlib.ExitStack() as schedulers:
            addresses = {}
            for policy_label, port in zip(policies, ports):
                first = next(run for run in stack_runs if run.policy_label == policy_label)
                progress.start(f"starting the scheduler for policy {policy_label}")
                scheduler = schedulers.enter_context(
                    _scheduler_stack(specs[-1], first, args.startup_timeout, port))
                addresses[policy_label] = scheduler.specs[0].address
                # Warm-up: the first request of a fresh scheduler pays one-off costs.
                asyncio.run(replay(addresses[policy_label], [0.0], prompts[first.workload][:1], "", 4))
            for repeat, run in order:
                progress.start(_describe(run) + _repeat_label(repeat, repeats[run.rate]))
                trace = poisson_trace(run.rate, args.requests, args.seed)
                results = asyncio.run(replay(addresses[run.policy_label], trace, prompts[run.workload],
                                             run.request_proposer, args.max_tokens, timeout=args.timeout))
                measured[run].append((results, max((r.done_s for r in results), default=0.0)))
                progress.advance()
        for run in stack_runs:
            rows += stack_rows(run, pool(measured[run]), args.max_tokens)
    if peer_runs:
        rows += run_peers(peer_runs, prompts, args, progress)
    progress.close()
    return rows


def stack_rows(run: RunConfig, figures: dict, max_tokens: int) -> list[dict]:
    """The rows of one stack run: one per proposer label it stands for. A shared row (policy none, run
    once with `measured_with`) is marked "shared": true under every label."""
    shared = bool(run.shared_with)
    return [{"policy": run.policy_label, "proposer": label, "workload": run.workload, "rate": run.rate,
             "max_tokens": max_tokens, **figures, "shared": shared,
             **({"measured_with": run.proposer} if shared else {})} for label in run.labels]


def peer_threads(args: argparse.Namespace) -> int:
    """Torch threads of the peers: --peer-threads, else what the services get (--service-threads), else
    0 (torch's default)."""
    return getattr(args, "peer_threads", 0) or args.service_threads or 0


def run_peers(runs: list[RunConfig], prompts: dict[str, list[str]], args: argparse.Namespace,
              progress: Progress | None = None) -> list[dict]:
    """Run the Hugging Face peers of `runs` in this process (bench.hf_peers) on the same traces and
    prompts as the stack; one row per run."""
    import torch

    from bench import hf_peers
    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_TARGET

    threads, previous = peer_threads(args), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        needs_draft = any(run.policy == "hf-assisted" for run in runs)
        if progress:
            progress.start(f"loading the Hugging Face peers (torch threads {torch.get_num_threads()})")
        models = hf_peers.load_peer_models(args.model or DEFAULT_TARGET,
                                           (args.draft_model or DEFAULT_DRAFT) if needs_draft else None)
        lookup = getattr(args, "peer_lookup_tokens", hf_peers.DEFAULT_LOOKUP_TOKENS)
        prompt_ids = {w: [models.encode(text) for text in texts] for w, texts in prompts.items()}
        first = next(iter(prompt_ids.values()))[0]
        hf_peers.warm_up(models, list(dict.fromkeys(run.policy for run in runs)), first, lookup)
        repeats = repeats_per_rate(args)
        measured: dict[RunConfig, list[list]] = {run: [] for run in runs}
        for repeat in range(max(repeats.values(), default=0)):
            for run in runs:
                if repeat >= repeats[run.rate]:
                    continue
                if progress:
                    progress.start(_describe(run) + _repeat_label(repeat, repeats[run.rate]))
                trace = poisson_trace(run.rate, args.requests, args.seed)
                measured[run].append(hf_peers.run_peer(models, run.policy, trace, prompt_ids[run.workload],
                                                       args.max_tokens, lookup))
                if progress:
                    progress.advance()
        rows = [peer_row(run, measured[run], args.max_tokens) for run in runs]
    finally:
        torch.set_num_threads(previous)  # the caller's setting (a test process, say) is left as it was
    return rows


def peer_row(run: RunConfig, repeats: list[list], max_tokens: int) -> dict:
    """The row of one peer run (a hf_peers.PeerResult list per repeat, pooled as the stack's runs are) with
    the stack rows' figures; acceptance and mean k are null where the peer does not speculate or its counts
    are unknown."""
    figures = pool([([RequestResult(r.index, r.arrival_s, r.start_s, r.done_s, r.latency_ms, ttft_ms=r.ttft_ms,
                                    prompt_tokens=r.prompt_tokens, completion_tokens=len(r.token_ids),
                                    proposed=r.proposed or 0, accepted=r.accepted or 0, steps=r.steps or 0)
                      for r in results], max((r.done_s for r in results), default=0.0)) for results in repeats])
    counted = run.policy != "hf-generate" and all(r.proposed is not None for results in repeats for r in results)
    if not counted:
        figures.update(acceptance_rate=None, mean_k=None, mean_accepted_per_step=None)
        if run.policy != "hf-generate":
            figures.update(proposed=None, accepted=None)
    return {"policy": run.policy_label, "proposer": run.proposer, "workload": run.workload, "rate": run.rate,
            "max_tokens": max_tokens, **figures, "shared": False, "peer": True}


# ---------------------------------------------------------------------------------------------------------
# Output

TABLE_COLUMNS = [
    ("workload", "workload", "{}"), ("proposer", "proposer", "{}"), ("policy", "policy", "{}"),
    ("rate", "rate (req/s)", "{:g}"), ("requests", "requests", "{}"), ("errors", "errors", "{}"),
    ("mean_latency_ms", "mean latency (ms)", "{:.0f}"), ("p50_latency_ms", "p50 (ms)", "{:.0f}"),
    ("p99_latency_ms", "p99 (ms)", "{:.0f}"), ("mean_ttft_ms", "mean TTFT (ms)", "{:.0f}"),
    ("ms_per_output_token", "ms/token", "{:.1f}"), ("goodput_tok_s", "goodput (tok/s)", "{:.1f}"),
    ("acceptance_rate", "acceptance", "{:.1%}"), ("mean_k", "mean k", "{:.2f}"),
    ("mean_accepted_per_step", "accepted/step", "{:.2f}"),
    ("proposer_share", "steps served by", "{}"),
]


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == {}:
        return "–"
    if isinstance(value, Mapping):  # proposer -> share of the steps
        return ", ".join(f"{name} {share:.0%}" for name, share in value.items())
    return fmt.format(value)


def _row_order(row: dict) -> tuple:
    # Stack rows by proposer then policy; the peers after them within a workload.
    return (row["workload"], bool(row.get("peer")), row["proposer"], row["policy"], row["rate"])


def markdown_table(rows: list[dict]) -> str:
    """Every row as one markdown table; `none` rows run once and reported for each proposer are marked *."""
    lines = ["| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
             "|" + " --- |" * len(TABLE_COLUMNS)]
    for row in sorted(rows, key=_row_order):
        cells = [_cell(row.get(key), fmt) for key, _, fmt in TABLE_COLUMNS]
        if row.get("shared"):
            cells[2] += "*"
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if any(row.get("shared") for row in rows):
        shared = next(row for row in rows if row.get("shared"))
        text += (f"\n\\* policy none never speculates: it ran once per workload and rate (with proposer "
                 f"{shared.get('measured_with', '?')}) and that row is repeated for every proposer.\n")
    if any(row.get("peer") for row in rows):
        text += ("\nProposer `hf`: Hugging Face transformers peers (bench.hf_peers), one request at a time in "
                 "arrival order; `–` where a figure does not apply.\n")
    return text


def plot_latency(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per (workload, proposer): mean latency against rate, one solid line per policy, and the
    Hugging Face peers of that workload as dashed grey lines in every plot of the workload (they have no
    proposer of their own; the same peer lines appear under ngram, draft, both and medusa)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stack = [r for r in rows if not r.get("peer")]
    peers = [r for r in rows if r.get("peer")]
    peer_styles = {"hf-generate": ("0.25", "s"), "hf-assisted": ("0.45", "^"), "hf-prompt-lookup": ("0.65", "v")}
    paths = []
    for workload, proposer in dict.fromkeys((r["workload"], r["proposer"]) for r in stack):
        group = [r for r in stack if r["workload"] == workload and r["proposer"] == proposer]
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in dict.fromkeys(r["policy"] for r in group):
            points = sorted((r["rate"], r["mean_latency_ms"]) for r in group if r["policy"] == policy)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=policy)
        workload_peers = [r for r in peers if r["workload"] == workload]
        for policy in dict.fromkeys(r["policy"] for r in workload_peers):
            color, marker = peer_styles.get(policy, ("0.5", "x"))
            points = sorted((r["rate"], r["mean_latency_ms"]) for r in workload_peers if r["policy"] == policy)
            ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="--", color=color, marker=marker,
                    label=policy)
        ax.set_xscale("log")
        ax.set_yscale("log" if workload_peers else "linear")  # the peers' queues grow far past the stack's
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
    """serving.json, serving.md, the plots and summary.md (bench.summary's checks) under `out`."""
    from bench import summary

    out.mkdir(parents=True, exist_ok=True)
    settings = dict(vars(args)) if args is not None else {}
    json_path, md_path = out / "serving.json", out / "serving.md"
    json_path.write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    header = "# Serving benchmark\n\nMade by `python -m bench.serving`"
    if settings:
        header += f" with {', '.join(f'{k}={v}' for k, v in settings.items())}"
    md_path.write_text(header + ".\n\n" + markdown_table(rows))
    summary_path = summary.write_summary(json_path)
    return [json_path, md_path, summary_path, *plot_latency(rows, out)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"arrival rates in requests/s (default {DEFAULT_RATES})")
    parser.add_argument("--policies", default=DEFAULT_POLICIES,
                        help=f"policies, fixed:K for fixed with k=K; a policy may add scheduler flags after '~', "
                             f"e.g. smartspec~max-k=4 (default {DEFAULT_POLICIES})")
    parser.add_argument("--proposers", default=DEFAULT_PROPOSERS,
                        help=f"ngram, draft, medusa (fixed:N = a tree of N nodes), both (ngram and draft, the "
                             f"scheduler's choice) (default {DEFAULT_PROPOSERS})")
    parser.add_argument("--peers", default=DEFAULT_PEERS,
                        help=f"Hugging Face transformers peers run after the stack, in this process, one request at "
                             f"a time: {', '.join(PEERS)}; '' for none (default all)")
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"code, copy (default {DEFAULT_WORKLOADS})")
    parser.add_argument("--requests", type=int, default=32, help="requests per run (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival traces")
    parser.add_argument("--repeats", default="1",
                        help="replay every run this many times, interleaved, and pool the requests: one number, or "
                             "one per rate in --rates order (e.g. 3,3,8) (default 1)")
    parser.add_argument("--out", default="docs/bench", help="output folder (default docs/bench)")
    parser.add_argument("--model", help="target checkpoint folder (default: models/smollm2-135m-instruct, "
                            "installed by make default-model)")
    parser.add_argument("--draft-model", help="draft checkpoint folder (default: the embedded models/smollm2-draft)")
    parser.add_argument("--medusa-model", help="Medusa heads folder (default: the embedded models/smollm2-medusa)")
    parser.add_argument("--service-threads", type=int, default=0,
                        help="torch threads per service (SPECDEC_TORCH_THREADS), 0 = their default")
    parser.add_argument("--peer-threads", type=int, default=0,
                        help="torch threads of the Hugging Face peers, 0 = --service-threads (default)")
    parser.add_argument("--peer-lookup-tokens", type=int, default=DEFAULT_LOOKUP_TOKENS,
                        help=f"prompt_lookup_num_tokens of hf-prompt-lookup (default {DEFAULT_LOOKUP_TOKENS}, "
                             f"the stack's largest k)")
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline of each request in seconds")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for each service")


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ValueError on flags the sweep cannot run with, before anything starts."""
    if args.requests < 1 or args.max_tokens < 1:
        raise ValueError("--requests and --max-tokens must be >= 1")
    if args.peer_lookup_tokens < 1 or args.peer_threads < 0 or args.service_threads < 0:
        raise ValueError("--peer-lookup-tokens must be >= 1, --peer-threads and --service-threads >= 0")
    plan(args)
    repeats_per_rate(args)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, write its JSON, table, plots and summary.md under --out and print the summary; the exit
    status: 0, 2 for bad flags, 1 when a service of the stack does not start."""
    from specdec.ops.launcher import StackError

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        rows = run_sweep(args)
    except StackError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    paths = write_outputs(rows, Path(args.out), args)
    for path in paths:
        print(f"{PROG}: wrote {path}", file=sys.stderr)
    summary_md = next(path for path in paths if path.name == "summary.md")
    print(summary_md.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
