"""Trees against chains, offline: mean tokens per step of Medusa trees, Medusa chains and draft chains.

In process, no gRPC: a `VerifierCore` on the target greedily decodes held-out code prompts
(`bench.serving.code_completion_prompts`), all prompts in one ragged batch per step. At each step every
request brings n verified candidate nodes from one proposer:

- tree:  the Medusa heads on the request's last hidden state (returned by the verifier), then
         `build_tree(log_probs, budget=n, top_k)`: the best-first tree of n nodes;
- chain: the heads' top-1 path, n nodes (n <= number of heads): `build_tree(..., top_k=1)`;
- draft: the draft model's greedy chain of n tokens (`proposer_svc.draft.DraftProposer`).

Tokens per step = accepted candidates + the bonus token, averaged over all request-steps. Every run's output
is asserted equal to plain greedy decoding of the target (the verifier's losslessness). Also reported: the
verifier's forward time per step (the whole batch, CPU float32; these times are only comparable side by side).

    .venv/bin/python bench/medusa_trees.py --out docs/medusa_trees
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.serving import TOKENIZER_FILE, code_completion_prompts  # noqa: E402
from proposer_svc.base import ProposalRequest  # noqa: E402
from proposer_svc.draft import DraftProposer  # noqa: E402
from specdec.model.checkpoint import CODE_DRAFT, CODE_MEDUSA, CODE_TARGET  # noqa: E402
from specdec.model.medusa import MedusaHeads, build_tree, load_medusa_heads  # noqa: E402
from verifier_svc.core import PrefillItem, VerifierCore, VerifyItem  # noqa: E402

COMMAND = ".venv/bin/python bench/medusa_trees.py --out docs/medusa_trees"


@dataclass
class Request:
    rid: str
    output: list[int]  # generated tokens, the first one from prefill
    hidden: bytes  # the verifier's hidden state at the position the pending token came from
    unsent: list[int] = field(default_factory=list)  # committed tokens the draft proposer has not seen


@dataclass
class Run:
    method: str
    nodes: int  # candidate nodes verified per request-step
    steps: int  # request-steps
    tokens: int  # accepted + bonus over all request-steps
    verify_ms: float  # verifier forward time summed over batched steps
    batched_steps: int
    propose_ms: float
    nodes_sent: int

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps

    def as_dict(self) -> dict:
        return {"method": self.method, "nodes": self.nodes, "tokens_per_step": self.tokens_per_step,
                "mean_nodes_sent": self.nodes_sent / self.steps, "request_steps": self.steps,
                "verify_ms_per_step": self.verify_ms / self.batched_steps,
                "propose_ms_per_step": self.propose_ms / self.batched_steps}


# A proposer: (the step's active requests) -> per request (token_ids, parent_indices).
Propose = Callable[[list[Request]], list[tuple[list[int], list[int]]]]


def decode(core: VerifierCore, prompts: list[list[int]], max_tokens: int, propose: Propose | None,
           tag: str) -> tuple[list[list[int]], Run]:
    """Greedy decoding of every prompt for `max_tokens` tokens, all requests in one batch per step."""
    out = core.prefill([PrefillItem(f"{tag}-{i}", p) for i, p in enumerate(prompts)], return_hidden=True)
    requests = [Request(r.request_id, [r.next_token_id], r.hidden_state, list(p) + [r.next_token_id])
                for r, p in zip(out.results, prompts)]
    run = Run(tag, 0, 0, 0, 0.0, 0, 0.0, 0)
    try:
        while active := [r for r in requests if len(r.output) < max_tokens]:
            started = time.perf_counter()
            candidates = propose(active) if propose else [([], [])] * len(active)
            run.propose_ms += (time.perf_counter() - started) * 1e3
            verified = core.verify([VerifyItem(r.rid, t, p) for r, (t, p) in zip(active, candidates)],
                                   return_hidden=True)
            run.verify_ms += verified.timing.forward_ms
            run.batched_steps += 1
            for r, (tokens, _), result in zip(active, candidates, verified.results):
                new = result.accepted_token_ids + [result.bonus_token_id]
                r.output += new
                r.unsent += new
                r.hidden = result.hidden_state
                run.steps += 1
                run.tokens += len(new)
                run.nodes_sent += len(tokens)
    finally:
        core.release([r.rid for r in requests])
    return [r.output[:max_tokens] for r in requests], run


def medusa_proposer(heads: MedusaHeads, nodes: int, top_k: int) -> Propose:
    def propose(active: list[Request]):
        hidden = torch.from_numpy(np.stack([np.frombuffer(r.hidden, dtype="<f4") for r in active]))  # [B, d]
        with torch.inference_mode():
            log_probs = torch.log_softmax(heads(hidden).float(), dim=-1)  # [B, H, V]
        return [build_tree(lp, nodes, top_k) for lp in log_probs]

    return propose


def draft_proposer(draft: DraftProposer, nodes: int) -> Propose:
    seen: set[str] = set()

    def propose(active: list[Request]):
        items = []
        for r in active:
            items.append(ProposalRequest(r.rid, r.unsent, reset=r.rid not in seen, budget=nodes))
            seen.add(r.rid)
            r.unsent = []
        answers = draft.step(items)
        return [(a.token_ids, a.parent_indices) for a in answers]

    return propose


def render_markdown(figures: dict) -> str:
    runs = figures["runs"]
    by = {(r["method"], r["nodes"]): r for r in runs}
    a = figures["args"]
    lines = [
        "# Medusa trees against chains",
        "",
        f"Greedy decoding of {a['prompts']} held-out code prompts (`bench.serving.code_completion_prompts`, seed "
        f"{a['seed']}) for {a['max_tokens']} tokens each by `models/code-target` through `VerifierCore` (in process, "
        f"CPU float32, all prompts in one ragged batch per step). Each step every request brings n candidate "
        f"nodes: the best-first **tree** of n nodes from the Medusa heads (`models/code-medusa`, "
        f"{figures['num_heads']} heads, top_k={a['top_k']}), the heads' top-1 **chain** (n <= {figures['num_heads']}), "
        f"or the **draft** model's greedy chain (`models/code-draft`). Every run's output equals plain greedy "
        f"decoding token for token (asserted).",
        "",
        "Tokens per step = accepted candidates + the bonus token, mean over request-steps (plain decoding: 1).",
        "",
        "| n verified nodes | Medusa tree | Medusa chain | draft chain | tree verify ms/step | "
        "tree propose ms/step | draft propose ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    plain = by[("plain", 0)]
    lines.append(f"| 0 (plain) | 1.00 | 1.00 | 1.00 | {plain['verify_ms_per_step']:.1f} | - | - |")
    for n in a["sizes"]:
        cells = []
        for method in ("tree", "chain", "draft"):
            r = by.get((method, n))
            cells.append(f"{r['tokens_per_step']:.2f}" if r else "-")
        tree, drafted = by.get(("tree", n)), by.get(("draft", n))
        cells.append(f"{tree['verify_ms_per_step']:.1f}" if tree else "-")
        cells.append(f"{tree['propose_ms_per_step']:.1f}" if tree else "-")
        cells.append(f"{drafted['propose_ms_per_step']:.1f}" if drafted else "-")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"ms/step: per batched step ({a['prompts']} requests, fewer at the end), {a['threads']} torch threads: the "
        f"verifier's forward, and the proposer's work (heads + tree building, or the draft model's n sequential "
        f"forwards). Every row in medusa_trees.json.",
        "",
        "Made with:",
        "",
        f"    {COMMAND}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, default=CODE_TARGET)
    p.add_argument("--heads", type=Path, default=CODE_MEDUSA)
    p.add_argument("--draft", type=Path, default=CODE_DRAFT)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--sizes", default="1,2,3,4,6,8,12,16", help="candidate nodes per step")
    p.add_argument("--draft-max", type=int, default=16, help="largest draft chain")
    p.add_argument("--top-k", type=int, default=4, help="children per tree node")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = p.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
    prompts = [tokenizer.encode(text).ids for text in code_completion_prompts(args.prompts, args.seed)]
    max_seq_len = max(map(len, prompts)) + args.max_tokens + max(args.sizes) + 2
    core = VerifierCore.from_checkpoint(args.target, device="cpu", dtype="float32", max_slots=args.prompts,
                                        max_seq_len=max_seq_len, max_batch_size=args.prompts)
    heads = load_medusa_heads(args.heads)
    if heads.config.hidden_size != core.info().hidden_size:
        raise SystemExit(f"heads take hidden size {heads.config.hidden_size}, the target has {core.info().hidden_size}")
    draft = DraftProposer.from_checkpoint(args.draft, device="cpu", dtype="float32", max_slots=args.prompts,
                                          max_seq_len=max_seq_len, max_budget=max(args.sizes))

    reference, plain = decode(core, prompts, args.max_tokens, None, "plain")
    plain.method = "plain"
    runs = [plain]
    plan = [("tree", n) for n in args.sizes]
    plan += [("chain", n) for n in args.sizes if n <= heads.config.num_heads]
    plan += [("draft", n) for n in args.sizes if n <= args.draft_max]
    for method, n in plan:
        if method == "draft":
            propose = draft_proposer(draft, n)
        else:
            propose = medusa_proposer(heads, n, args.top_k if method == "tree" else 1)
        outputs, run = decode(core, prompts, args.max_tokens, propose, f"{method}{n}")
        if method == "draft":
            draft.release(draft.active_request_ids())
        assert outputs == reference, f"{method} n={n}: greedy output differs from plain decoding"
        run.method, run.nodes = method, n
        runs.append(run)
        print(f"{method:5s} n={n:2d}: {run.tokens_per_step:.2f} tokens/step, "
              f"{run.verify_ms / run.batched_steps:.1f} verify ms/step", flush=True)

    figures = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "num_heads": heads.config.num_heads,
        "prompt_tokens": [len(p) for p in prompts],
        "runs": [r.as_dict() for r in runs],
    }
    print(render_markdown(figures))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(render_markdown(figures))
        args.out.with_suffix(".json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
