"""The main job: the whole stack on the embedded models, a few completions, and what speculation did.

Starts verifier, prompt-lookup and draft proposers and scheduler (goodput policy `smartspec`) as
separate processes on loopback, sends each prompt without speculation, with each proposer alone, and
with the policy's own choice of proposer per step, and prints the completion with its stats. Greedy
output must be the same token for token in every row: the demo checks it.

    .venv/bin/python -m specdec.ops.demo
"""

from __future__ import annotations

import argparse
import sys
import time

from specdec.ops.launcher import Stack, free_ports, local_specs
from specdec_client import Client

PROMPTS = [
    "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items.\"\"\"\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    parser = argparse.ArgumentParser(",
    # Copy-heavy: the answer repeats spans of the prompt, where prompt lookup shines.
    "    def __repr__(self):\n        return '%s(%r, %r)' % (self.__class__.__name__, self.name, self.value)\n\n"
    "    def __eq__(self, other):\n        return self.name == other.name and self.value == other.value\n\n"
    "    def __repr__(self):\n",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--policy", default="smartspec")
    args = p.parse_args(argv)

    (port,) = free_ports(1)
    specs = local_specs(port, proposers=("ngram", "draft"), policy=args.policy)
    print(f"starting the stack on 127.0.0.1:{port} (verifier, proposer-ngram, proposer-draft, scheduler) ...")
    mismatches = 0
    with Stack(specs) as stack, Client(f"127.0.0.1:{port}") as client:
        client.wait_ready(timeout=120)
        print(f"ready; service logs in {stack.log_dir}\n")
        for prompt in PROMPTS:
            print("=" * 100)
            print(prompt, end="")
            baseline = None
            for proposer in ("none", "ngram", "draft", ""):
                t0 = time.perf_counter()
                result = client.generate(prompt, max_tokens=args.max_tokens, temperature=0.0, proposer=proposer)
                elapsed_ms = (time.perf_counter() - t0) * 1e3
                if baseline is None:
                    baseline, baseline_ms = result, elapsed_ms
                    print(f"\033[32m{result.text}\033[0m")
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
