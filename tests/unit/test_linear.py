"""Prepacked projections: F.linear's values up to fp32 rounding, a row's output independent of the
rows beside it, and a verifier's chain scored as its tokens are when decoded one at a time.

Lossless greedy verification needs a token checked inside a chain of k to get the logits it gets
decoded alone, up to rounding far below the gap between two candidate tokens (bf16 does not: see
docs/chain_invariance.md in git history).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specdec.model.checkpoint import CODE_TARGET
from specdec.model.linear import Linear, can_prepack
from specdec.model.runner import ModelRunner
from specdec.testing import logits_alone_and_in_chains

pytestmark = pytest.mark.skipif(not can_prepack(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN CPU path")


@pytest.mark.parametrize("shape,bias", [((96, 32), False), ((40, 72), True)])
def test_packed_linear_matches_f_linear_and_rows_do_not_depend_on_the_batch(shape, bias):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(*shape, generator=gen)
    b = torch.randn(shape[0], generator=gen) if bias else None
    packed, plain = Linear.of(weight, b, prepack=True), Linear.of(weight, b, prepack=False)
    assert packed.packed is not None and plain.packed is None
    x = torch.randn(300, shape[1], generator=gen)
    torch.testing.assert_close(packed(x), F.linear(x, weight, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(plain(x), F.linear(x, weight, b))
    alone = torch.cat([packed(x[i : i + 1]) for i in range(40)])
    for rows in (2, 3, 8, 9, 17, 40):
        assert torch.equal(packed(x[:rows]), alone[:rows]), f"{rows} rows"


def test_prepack_follows_device_and_dtype():
    assert can_prepack(torch.device("cpu"), torch.float32)
    assert not can_prepack(torch.device("cpu"), torch.bfloat16)
    assert not can_prepack(torch.device("cuda"), torch.float32)
    runner = ModelRunner(CODE_TARGET, device="cpu", dtype="float32", max_slots=1, max_seq_len=8)
    assert runner.weights.lm_head.packed is not None and runner.weights.layers[0].qkv.packed is not None
    plain = ModelRunner(CODE_TARGET, device="cpu", dtype="float32", max_slots=1, max_seq_len=8, prepack=False)
    assert plain.weights.layers[0].down.packed is None


def test_a_chain_verified_at_once_gets_the_logits_of_one_token_at_a_time():
    """The embedded target, prepacked: 24 tokens decoded one by one, then the same tokens re-run from
    the same context in chains of 1, 2, 5 and 8 (a verifier step's shapes): the same logits up to fp32
    rounding (attention over 1 or k query rows sums in another order), the same argmax."""
    rng = random.Random(0)
    runner = ModelRunner(CODE_TARGET, device="cpu", dtype="float32", max_slots=2, max_seq_len=160)
    context = [rng.randrange(1, runner.vocab_size) for _ in range(60)]
    tokens, alone, chained = logits_alone_and_in_chains(runner, context, 24, (1, 2, 5, 8))
    next_tokens = tokens[1:] + [int(alone[-1].argmax())]
    for chain, together in chained.items():
        for j, (a, b) in enumerate(zip(alone, together, strict=True)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"chains of {chain}: token {j}")
            assert int(a.argmax()) == int(b.argmax()) == next_tokens[j]


@pytest.mark.parametrize("given, expected", [(None, "8192"), ("77", "77")])
def test_loading_the_projections_raises_onednn_kernel_cache_unless_the_operator_set_it(given, expected):
    """The cache must hold a kernel per row count serving produces (specdec/model/linear.py); oneDNN reads the
    variable once, so it is set when the module loads, in a fresh process, and an explicit setting wins."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    code = "import os, specdec.model.linear; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == expected
