"""The product's benchmarks, each a module run from the repository root with `python -m`:

    python -m bench.serving         # latency and goodput per policy under Poisson arrivals, against Hugging Face
    python -m bench.runner_cost     # the model runner's step time by batch size and new tokens
    python -m bench.step_overhead   # per-step overhead: step wall time minus the model forwards
    python -m bench.http_overhead   # the OpenAI-compatible HTTP API against gRPC, same scheduler

`summary` checks a serving run against the policy's targets, `hf_peers` serves the same traces with
transformers. Their current results and the commands that made them: docs/benchmarks.md. The plots need the
`bench` extra (matplotlib); nothing here is part of the service image.
"""
