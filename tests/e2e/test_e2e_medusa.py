"""Medusa tree heads end to end over real gRPC on loopback, every service in its own process.

The stack: a tiny random target with the real tokenizer, heads fitted for a few seconds on that
target's own continuations (so trees are accepted often enough to matter), a prompt-lookup proposer for
chain requests. Checked here:

- greedy output equals the target alone, token for token, with trees of several shapes (fixed budgets of
  1, 4 and 10 nodes, and budgets the goodput policy picks), requests pinned to the tree proposer running
  in the same ragged batches as requests pinned to the chain proposer; also with heads asked for trees only
  where the plan wants one (not free);
- sampled output with trees has the target's distribution (chi-square over all 27 completions);
- heads that do not match the target's hidden size stop the scheduler at start with a message saying
  so, and a heads folder that does not load stops the proposer at start naming the problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from specdec.ops.launcher import Stack, StackError, free_ports, local_specs
from specdec.model.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
from specdec.testing import (
    chi_square_passes,
    exact_topk_distribution,
    make_tiny_medusa_heads,
    make_tiny_stack_checkpoints,
)
from specdec_client import AsyncClient
from test_e2e import EOS, SERVICE_ENV, target_alone, workload

PROPOSERS = ("ngram", "medusa")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    target, _ = make_tiny_stack_checkpoints(root, eos_token_id=EOS)
    return target, make_tiny_medusa_heads(target, root / "medusa")


@pytest.fixture(scope="module")
def backends(models):
    target, heads = models
    specs = local_specs(free_ports(1)[0], PROPOSERS, model=target, medusa_model=heads, env=SERVICE_ENV)
    with Stack(specs[:-1], startup_timeout_s=180, grace_s=5) as stack:
        yield stack, specs[-1]


def scheduler_spec(backends, policy: str, k: int):
    _, scheduler = backends
    args = list(scheduler.args)
    args[args.index("--policy") + 1] = policy
    args[args.index("--k") + 1] = str(k)
    return dataclasses.replace(scheduler, args=args, depends_on=[])


@pytest.fixture(scope="module")
def reference_model(models):
    return AutoModelForCausalLM.from_pretrained(models[0], dtype=torch.float32).eval()


async def run_mixed(port: int, requests, proposers, **kwargs):
    """Every request with its own proposer, all concurrently (staggered by their delays)."""
    async with AsyncClient(f"127.0.0.1:{port}", timeout=120) as client:
        async def one(request, proposer):
            prompt, max_tokens, delay = request
            await asyncio.sleep(delay)
            return await client.generate(prompt, max_tokens=max_tokens, proposer=proposer, **kwargs)

        return await asyncio.gather(*(one(r, p) for r, p in zip(requests, proposers)))


@pytest.mark.parametrize("policy,k", [("fixed", 1), ("fixed", 4), ("fixed", 10), ("smartspec", 5)])
def test_greedy_trees_equal_target_alone(backends, reference_model, policy, k):
    requests = workload(seed=20 + k, count=10)
    expected = [target_alone(reference_model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    proposers = ["medusa" if i % 2 == 0 else "ngram" for i in range(len(requests))]
    if policy == "smartspec":
        proposers[1] = ""  # and one left to the policy's choice
    with Stack([scheduler_spec(backends, policy, k)], startup_timeout_s=120, grace_s=5) as scheduler:
        results = asyncio.run(run_mixed(scheduler.specs[0].port, requests, proposers))
    for (prompt, _, _), proposer, want, got in zip(requests, proposers, expected, results):
        assert got.token_ids == want, f"{policy} k={k} {proposer or 'auto'} prompt of {len(prompt)} tokens"
    tree = [r.stats.proposers.get("medusa") for r in results]
    proposed = sum(t.proposed for t in tree if t is not None)
    accepted = sum(t.accepted for t in tree if t is not None)
    assert 0 <= accepted <= proposed
    if policy == "fixed":
        # Fixed budgets always speculate, and the fitted heads are right often enough to be accepted.
        assert proposed > 0 and accepted > 0, (k, proposed, accepted)
        steps = sum(t.steps for t in tree if t is not None)
        # A tree of k nodes per step (fewer only near a request's end, where depth is capped).
        assert proposed > 0.5 * k * steps, (k, proposed, steps)


def test_heads_asked_only_where_planned_give_the_target_alone(models, reference_model):
    """Heads that are not free (--free no: large vocabulary projections) are called after the plan, for the
    requests it gives a tree budget; output is still the target's own."""
    target, heads = models
    specs = local_specs(free_ports(1)[0], ("ngram", "medusa"), model=target, medusa_model=heads, env=SERVICE_ENV,
                        policy="smartspec", extra_args={"proposer-medusa": ["--free", "no"]})
    requests = workload(seed=41, count=8)
    expected = [target_alone(reference_model, prompt, max_tokens) for prompt, max_tokens, _ in requests]
    proposers = ["medusa" if i % 2 == 0 else "" for i in range(len(requests))]
    with Stack(specs, startup_timeout_s=180, grace_s=5) as stack:
        results = asyncio.run(run_mixed(stack.specs[-1].port, requests, proposers))
    for (prompt, _, _), proposer, want, got in zip(requests, proposers, expected, results):
        assert got.token_ids == want, f"{proposer or 'auto'} prompt of {len(prompt)} tokens"
    tree = [r.stats.proposers.get("medusa") for r in results]
    assert sum(t.proposed for t in tree if t is not None) > 0  # the plan did ask the costed heads


def test_sampled_trees_have_the_target_distribution(backends, reference_model):
    prompt = [17, 230, 17, 230, 17]
    temperature, top_k, n_tokens, n_samples = 1.5, 3, 3, 600

    exact = exact_topk_distribution(reference_model, prompt, temperature, top_k, n_tokens)
    assert len(exact) == top_k**n_tokens
    assert EOS not in set(itertools.chain(*exact))

    counts = dict.fromkeys(exact, 0)
    accepted = 0
    with Stack([scheduler_spec(backends, "fixed", 6)], startup_timeout_s=120, grace_s=5) as scheduler:
        for start in range(0, n_samples, 50):
            results = asyncio.run(run_mixed(scheduler.specs[0].port, [(prompt, n_tokens, 0.0)] * 50,
                                            ["medusa"] * 50, temperature=temperature, top_k=top_k, seed=None,
                                            ignore_eos=True))
            for r in results:
                counts[tuple(r.token_ids)] += 1  # a KeyError would mean an impossible completion
                accepted += r.stats.accepted
    assert accepted > 0  # trees were accepted, so the test says something about tree verification
    keys = sorted(exact)
    passes, stat, df = chi_square_passes(torch.tensor([counts[k] for k in keys]),
                                         torch.tensor([exact[k] for k in keys]), min_expected=5)
    assert passes, f"chi-square {stat:.1f} with {df} degrees of freedom"


def test_heads_for_another_hidden_size_stop_the_scheduler_at_start(backends, models, tmp_path):
    stack, _ = backends
    target, _ = models
    wrong = tmp_path / "wrong-heads"
    save_medusa_heads(MedusaHeads(MedusaConfig(hidden_size=48, vocab_size=4096, num_heads=2)), wrong)
    specs = local_specs(free_ports(1)[0], ("medusa",), model=target, medusa_model=wrong, env=SERVICE_ENV)
    proposer, scheduler = specs[1], specs[2]
    args = list(scheduler.args)
    args[args.index("--verifier") + 1] = stack.spec("verifier").address
    scheduler = dataclasses.replace(scheduler, args=args, depends_on=[proposer.name])
    with pytest.raises(StackError) as failure:
        Stack([proposer, scheduler], startup_timeout_s=120, grace_s=5).start()
    message = str(failure.value)
    assert "scheduler" in message and "hidden states of size 48" in message and "hidden size 64" in message


def test_heads_that_do_not_load_stop_the_proposer_at_start(tmp_path):
    (tmp_path / "heads").mkdir()
    (tmp_path / "heads" / "config.json").write_text('{"model_type": "medusa", "hidden_size": 64}')
    for folder, phrase in ((tmp_path / "nowhere", "nowhere"), (tmp_path / "heads", "vocab_size")):
        run = subprocess.run([sys.executable, "-m", "proposer_svc", "--kind", "medusa", "--model", str(folder),
                              "--port", "0"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "cannot start the medusa proposer" in run.stderr and phrase in run.stderr, run.stderr[-2000:]
