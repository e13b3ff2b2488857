"""oneDNN's kernel cache against the row counts serving produces (specdec/model/linear.py).

A projection's compiled oneDNN kernel is cached per shape, and a verifier's projections see as many
shapes as a batch has token counts. This runs the embedded target on one request, cycling a few times
through forwards of 1..--max-rows tokens, once per cache capacity, each in its own process (oneDNN
reads ONEDNN_PRIMITIVE_CACHE_CAPACITY once); the first pass compiles every shape, later passes show
whether the cache kept them. The capacities run interleaved, pass by pass, so that drift in the
machine's speed falls on both alike.

    .venv/bin/python bench/primitive_cache.py --out docs/primitive_cache.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
from specdec.model.checkpoint import CODE_TARGET
from specdec.model.runner import ModelRunner, SeqInput

max_rows = int(sys.argv[1])
runner = ModelRunner(CODE_TARGET, max_slots=1, max_seq_len=max_rows + 8)
slot = runner.allocate()

def forward(rows):
    runner.truncate(slot, 0)
    start = time.perf_counter()
    runner.forward([SeqInput(slot, [5] * rows)])
    return (time.perf_counter() - start) * 1e3

forward(8)
print("ready", flush=True)
for line in sys.stdin:  # one pass per line read
    times = [forward(rows) for rows in range(1, max_rows + 1)]
    print(json.dumps(times), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capacities", default="1024,8192", help="ONEDNN_PRIMITIVE_CACHE_CAPACITY values")
    parser.add_argument("--max-rows", type=int, default=160, help="forwards of 1..this many tokens per pass")
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker, 0 = default")
    parser.add_argument("--out", default="docs/primitive_cache.md")
    args = parser.parse_args(argv)
    capacities = [int(c) for c in args.capacities.split(",")]
    root = Path(__file__).resolve().parent.parent
    workers = {}
    for capacity in capacities:
        env = dict(os.environ, ONEDNN_PRIMITIVE_CACHE_CAPACITY=str(capacity), PYTHONPATH=str(root))
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)  # torch reads it; SPECDEC_TORCH_THREADS only the services
        worker = subprocess.Popen([sys.executable, "-c", WORKER, str(args.max_rows)], env=env, cwd=root,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if worker.stdout.readline().strip() != "ready":
            raise SystemExit(f"worker for capacity {capacity} failed to start")
        workers[capacity] = worker
    passes: dict[int, list[list[float]]] = {c: [] for c in capacities}
    try:
        for i in range(args.passes):
            for capacity, worker in workers.items():  # one at a time: they would share the cores
                worker.stdin.write("pass\n")
                worker.stdin.flush()
                passes[capacity].append(json.loads(worker.stdout.readline()))
                print(f"pass {i + 1}/{args.passes} capacity {capacity}: {sum(passes[capacity][-1]):.0f} ms",
                      file=sys.stderr, flush=True)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait(timeout=30)

    small = min(40, args.max_rows)
    lines = [
        "# oneDNN kernel cache and the verifier's row counts",
        "",
        f"The embedded target on one request, forwards of 1..{args.max_rows} tokens in turn, {args.passes} passes per",
        "cache capacity (each in its own process, the capacities interleaved pass by pass). Pass 1 compiles",
        "every shape; later passes run on what the cache kept. Sums of the forwards' wall times.",
        "",
        "Made with:",
        "",
        (f"    .venv/bin/python bench/primitive_cache.py --max-rows {args.max_rows} --passes {args.passes} "
         f"--out {args.out}"),
        "",
        f"| capacity | pass | all {args.max_rows} forwards (ms) | 1..{small} tokens (ms) | per forward, 1..{small} (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for capacity in capacities:
        for i, times in enumerate(passes[capacity]):
            lines.append(f"| {capacity} | {i + 1} | {sum(times):.0f} | {sum(times[:small]):.0f} | "
                         f"{sum(times[:small]) / small:.2f} |")
    later = {c: sum(sum(t) for t in passes[c][1:]) for c in capacities}
    if len(capacities) > 1 and args.passes > 1:
        base = capacities[0]
        lines += ["", f"Passes 2..{args.passes}, against capacity {base}: " + ", ".join(
            f"{c}: {later[c] / later[base]:.2f}x the time" for c in capacities[1:]) + "."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"max_rows": args.max_rows, "passes": {str(c): passes[c] for c in capacities}}) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
