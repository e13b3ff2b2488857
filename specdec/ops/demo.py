"""The main job: the whole stack on the default chat model, a few chat requests, and what speculation did.

Starts the verifier (SmolLM2-135M-Instruct, installed by `make default-model`), the prompt-lookup, draft and
Medusa proposers and the scheduler (goodput policy `smartspec`) as separate processes on loopback, sends a few
held-out chat prompts (bench/prompts/chat_heldout.jsonl) without speculation, with each proposer alone, and
with the policy's own choice of proposer per step, and prints each reply with its stats. Greedy output must
be the same token for token in every row: the demo checks it.

    .venv/bin/python -m specdec.ops.demo
"""

from __future__ import annotations

import argparse
import sys
import time

from specdec.ops.chat_prompts import load_chat_prompts
from specdec.ops.launcher import Stack, free_ports, local_specs
from specdec_client import Client

# One held-out prompt per kind of work: a rewrite and an extraction (the reply repeats spans of the prompt,
# where prompt lookup shines), a coding task and a question.
PROMPT_IDS = ("rw-001", "ext-001", "code-001", "qa-001")
PROPOSERS = ("ngram", "draft", "medusa")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--policy", default="smartspec")
    args = p.parse_args(argv)

    (port,) = free_ports(1)
    by_id = {prompt.id: prompt for prompt in load_chat_prompts()}
    prompts = [by_id[i] for i in PROMPT_IDS]
    specs = local_specs(port, proposers=PROPOSERS, policy=args.policy)
    print(f"starting the stack on 127.0.0.1:{port} (verifier, {', '.join('proposer-' + k for k in PROPOSERS)}, "
          "scheduler) ...")
    mismatches = 0
    with Stack(specs) as stack, Client(f"127.0.0.1:{port}") as client:
        client.wait_ready(timeout=300)
        print(f"ready; service logs in {stack.log_dir}\n")
        for prompt in prompts:
            print("=" * 100)
            for message in prompt.messages:
                print(f"\033[1m{message.role}:\033[0m {message.content}")
            baseline = None
            for proposer in ("none", *PROPOSERS, ""):
                t0 = time.perf_counter()
                result = client.chat(prompt.as_dicts(), max_tokens=args.max_tokens, temperature=0.0,
                                     proposer=proposer)
                elapsed_ms = (time.perf_counter() - t0) * 1e3
                if baseline is None:
                    baseline, baseline_ms = result, elapsed_ms
                    print(f"\033[1massistant:\033[0m \033[32m{result.text}\033[0m")
                    print("-" * 100)
                same = result.token_ids == baseline.token_ids
                mismatches += not same
                s = result.stats
                print(
                    f"  {proposer or 'auto':>6}: {s.completion_tokens:3d} tokens in {s.steps:3d} steps, "
                    f"proposed {s.proposed:3d}, accepted {s.accepted:3d} "
                    f"({100 * s.acceptance_rate:5.1f}%), {elapsed_ms:7.1f} ms "
                    f"({baseline_ms / elapsed_ms:4.2f}x), "
                    f"{'same tokens as the target alone' if same else 'DIFFERENT FROM THE TARGET ALONE'}"
                )
            print()
    if mismatches:
        print(f"{mismatches} completions differ from the target alone", file=sys.stderr)
        return 1
    print("every speculative completion equals the target's own greedy output, token for token;")
    print("(N.NNx) is the speed-up over the target alone (proposer none) on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
