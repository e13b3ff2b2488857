"""The verifier over gRPC on a tiny random checkpoint, served in-process on 127.0.0.1 (port 0).

Backbone: Prefill + Verify with speculated chains and trees (some right, some wrong, several
requests in one ragged batch) produce exactly the tokens of a plain runner loop: greedy token for
token, and seeded sampling draw for draw (the draw at absolute position t comes from (seed, t)).
Then bad input: each malformed item gets INVALID_ARGUMENT naming the problem and leaves every other
request's state untouched; capacity, Release, Info and health.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.pb import common_pb2, verifier_pb2, verifier_pb2_grpc
from specdec.model.runner import ModelRunner, SeqInput
from specdec.model.sampling import SamplingParams, position_generator, sample, target_probs
from specdec.testing import TINY_DIMS, make_tiny_checkpoint
from specdec.model.verification import verify_rejection
from verifier_svc.config import VerifierConfig, parse_config
from verifier_svc.core import VerifierCore
from verifier_svc.server import SERVICE_NAME, start_server

VOCAB = TINY_DIMS["vocab_size"]
MAX_SEQ_LEN = 64
MAX_SLOTS = 6
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def server(checkpoint):
    """(port, core) of a verifier served from a background event loop; stopped at the end of the module."""
    core = VerifierCore.from_checkpoint(checkpoint, device="cpu", dtype="float32", max_slots=MAX_SLOTS,
                                        max_seq_len=MAX_SEQ_LEN, max_batch_size=4)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(start_server(core, "127.0.0.1", 0), loop).result(TIMEOUT_S)
    try:
        yield running.port, core
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(grace=1.0), loop).result(TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TIMEOUT_S)
        loop.close()


@pytest.fixture(scope="module")
def channel(server):
    port, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=TIMEOUT_S)
        yield ch


@pytest.fixture
def stub(channel):
    """The Verifier stub; every test must leave no request behind (checked after it)."""
    stub = verifier_pb2_grpc.VerifierStub(channel)
    yield stub
    info = stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=list(info.active_request_ids)), timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def reference_runner(checkpoint):
    return ModelRunner(checkpoint, device="cpu", dtype="float32", max_slots=2, max_seq_len=MAX_SEQ_LEN)


# -- references: a plain runner loop, one token per forward ---------------------------------------


def reference_generate(runner: ModelRunner, prompt: list[int], n: int, params: SamplingParams, seed: int = 0):
    """n tokens after `prompt`, one forward per token; returns (tokens, hidden [len(prompt) + n - 1, d])."""
    slot = runner.allocate()
    try:
        tokens, hidden, feed = [], [], list(prompt)
        while len(tokens) < n:
            out = runner.forward([SeqInput(slot, feed, last_logits_only=True)], return_hidden=True)[0]
            hidden.append(out.hidden)
            probs = target_probs(out.logits, params.temperature, params.top_p, params.top_k)[0]
            position = len(prompt) + len(tokens)  # the new token's index in the sequence
            token = int(probs.argmax()) if params.greedy else sample(probs, position_generator(seed, position))
            tokens.append(token)
            feed = [token]
        return tokens, torch.cat(hidden)
    finally:
        runner.release(slot)


# -- gRPC helpers --------------------------------------------------------------------------------


def sampling_pb(params: SamplingParams, seed: int | None = None) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k, seed=seed)


def prefill(stub, requests: dict[str, list[int]], params=SamplingParams(), seed=None) -> dict[str, int]:
    items = [verifier_pb2.PrefillItem(request_id=rid, token_ids=toks, sampling=sampling_pb(params, seed))
             for rid, toks in requests.items()]
    response = stub.Prefill(verifier_pb2.PrefillRequest(items=items), timeout=TIMEOUT_S)
    assert response.timing.batch_size == len(items)
    return {r.request_id: r.next_token_id for r in response.results}


def verify_item(rid: str, tokens=(), parents=(), distributions=None) -> verifier_pb2.VerifyItem:
    dists = [common_pb2.Distribution(probs=d) for d in distributions or []]
    return verifier_pb2.VerifyItem(
        request_id=rid,
        candidates=common_pb2.Candidates(request_id=rid, token_ids=tokens, parent_indices=parents,
                                         draft_distributions=dists),
    )


def oracle_candidates(style: str, truth: list[int], rng: random.Random) -> tuple[list[int], list[int]]:
    """Candidates after the pending token given the true continuation `truth`: sometimes right, sometimes not."""
    wrong = lambda t: (t + 1) % VOCAB  # noqa: E731
    if style == "none":
        return [], []
    if style == "chain":
        k = rng.randint(1, 4)
        chain = truth[:k]
        if rng.random() < 0.5:
            i = rng.randrange(k)
            chain[i] = wrong(chain[i])
        return chain, list(range(-1, k - 1))
    # Tree: a wrong first branch, then the right token with a (possibly wrong) chain below it.
    deep = [truth[1], truth[2] if rng.random() < 0.6 else wrong(truth[2])]
    return [wrong(truth[0]), truth[0], *deep, truth[1]], [-1, -1, 1, 2, 0]


def drive(stub, prompts: dict[str, list[int]], styles: dict[str, str], truths: dict[str, list[int]], n: int,
          params=SamplingParams(), seed=None, return_hidden=False):
    """Generate >= n tokens for every request through Prefill + Verify (all requests in each Verify batch).

    Returns (outputs, hidden, accepted_paths): per request its tokens, (sequence index, hidden bytes) of
    the last step, and the accepted index paths of every step.
    """
    rng = random.Random(0)
    outputs = {rid: [tok] for rid, tok in prefill(stub, prompts, params, seed).items()}
    hidden, paths = {}, {rid: [] for rid in prompts}
    while any(len(out) < n for out in outputs.values()):
        items = []
        for rid, out in outputs.items():
            if len(out) < n:
                tokens, parents = oracle_candidates(styles[rid], truths[rid][len(out):], rng)
                items.append(verify_item(rid, tokens, parents))
        response = stub.Verify(verifier_pb2.VerifyRequest(items=items, return_hidden=return_hidden),
                               timeout=TIMEOUT_S)
        assert response.timing.batch_size == len(items) and response.timing.forward_ms > 0
        assert response.timing.batched_tokens == sum(1 + len(i.candidates.token_ids) for i in items)
        for item, result in zip(items, response.results):
            assert result.request_id == item.request_id
            tokens = list(item.candidates.token_ids)
            assert list(result.accepted_token_ids) == [tokens[j] for j in result.accepted_indices]
            outputs[result.request_id] += [*result.accepted_token_ids, result.bonus_token_id]
            paths[result.request_id].append(list(result.accepted_indices))
            hidden[result.request_id] = (len(prompts[result.request_id]) + len(outputs[result.request_id]) - 2,
                                         result.hidden_state)
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=list(prompts)), timeout=TIMEOUT_S)
    return outputs, hidden, paths


def assert_speculation_happened(paths):
    """The oracle's chains and trees were (partly) accepted, the tree also through its second branch."""
    assert sum(len(p) for p in paths["b"]) >= 5
    assert any(p[:2] == [1, 2] for p in paths["c"]) and any(p == [] for p in paths["c"] + paths["b"])


# -- tests ---------------------------------------------------------------------------------------


PROMPTS = {"a": [5, 17, 3, 88, 42, 9], "b": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "c": [60, 61]}
STYLES = {"a": "none", "b": "chain", "c": "tree"}
N = 20


def test_greedy_speculation_equals_plain_greedy_loop(stub, reference_runner):
    params = SamplingParams()
    truths, ref_hidden = {}, {}
    for rid, prompt in PROMPTS.items():
        truths[rid], ref_hidden[rid] = reference_generate(reference_runner, prompt, N + 8, params)
    outputs, hidden, paths = drive(stub, PROMPTS, STYLES, truths, N, return_hidden=True)
    assert_speculation_happened(paths)
    for rid in PROMPTS:
        assert outputs[rid][:N] == truths[rid][:N], rid
        # The hidden state of the last kept node = the reference's at that sequence index.
        index, raw = hidden[rid]
        got = torch.frombuffer(bytearray(raw), dtype=torch.float32)
        torch.testing.assert_close(got, ref_hidden[rid][index], atol=1e-4, rtol=1e-4)


def test_seeded_sampling_with_speculation_equals_plain_sampling(stub, reference_runner):
    params, seed = SamplingParams(0.9, top_p=0.95, top_k=40), 1234
    truths = {rid: reference_generate(reference_runner, p, N + 8, params, seed)[0] for rid, p in PROMPTS.items()}
    outputs, _, paths = drive(stub, PROMPTS, STYLES, truths, N, params, seed)
    assert_speculation_happened(paths)
    for rid in PROMPTS:
        assert outputs[rid][:N] == truths[rid][:N], rid


def test_draft_distributions_select_rejection_sampling(stub, reference_runner):
    """A sampled chain with its q rows (shorter than the vocabulary: zero-padded) gets exactly the verdict of
    verify_rejection on the reference logits, with the request's seed and positions."""
    params, prompt = SamplingParams(1.0), [3, 1, 4, 1, 5]
    gen = torch.Generator().manual_seed(0)
    for seed in range(4):
        rid = f"rejection-{seed}"
        pending = prefill(stub, {rid: prompt}, params, seed)[rid]
        q = torch.rand(2, VOCAB - 7, generator=gen) ** 4
        q /= q.sum(-1, keepdim=True)
        chain = [int(torch.multinomial(row, 1, generator=gen)) for row in q]
        slot = reference_runner.allocate()
        try:
            first = reference_runner.forward([SeqInput(slot, prompt, last_logits_only=True)])[0].logits
            logits = reference_runner.forward([SeqInput(slot, [pending, *chain])])[0].logits
        finally:
            reference_runner.release(slot)
        assert pending == sample(target_probs(first, 1.0)[0], position_generator(seed, len(prompt)))
        expected = verify_rejection(logits, chain, torch.nn.functional.pad(q, (0, 7)), params, seed, len(prompt) + 1)
        response = stub.Verify(verifier_pb2.VerifyRequest(items=[verify_item(rid, chain, [-1, 0], q.tolist())]),
                               timeout=TIMEOUT_S)
        result = response.results[0]
        assert (list(result.accepted_indices), result.bonus_token_id) == (expected.accepted_indices,
                                                                         expected.bonus_token)
        stub.Release(verifier_pb2.ReleaseRequest(request_ids=[rid]), timeout=TIMEOUT_S)


def expect_invalid(stub, items, *fragments: str, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as err:
        stub.Verify(verifier_pb2.VerifyRequest(items=items), timeout=TIMEOUT_S)
    assert err.value.code() == code
    for fragment in fragments:
        assert fragment in err.value.details(), err.value.details()


def test_malformed_candidates_are_rejected_and_disturb_nothing(stub, reference_runner):
    prompts = {"good": [7, 8, 9, 10], "other": [11, 12]}
    truth, _ = reference_generate(reference_runner, prompts["good"], 12, SamplingParams())
    first = prefill(stub, prompts)
    assert first["good"] == truth[0]
    good = verify_item("good", truth[1:3], [-1, 0])  # a valid chain that would be accepted
    expect_invalid(stub, [good, verify_item("other", [1, 2], [-1, 5])], "parent index 5", "'other'")
    expect_invalid(stub, [good, verify_item("other", [1, VOCAB + 3], [-1, 0])], f"token id {VOCAB + 3}", "vocabulary")
    expect_invalid(stub, [good, verify_item("other", [-4], [-1])], "token id -4")
    expect_invalid(stub, [good, verify_item("ghost", [1], [-1])], "unknown request id 'ghost'",
                   code=grpc.StatusCode.NOT_FOUND)
    expect_invalid(stub, [good, verify_item("other", [1, 2], [-1])], "1 parent indices for 2")
    expect_invalid(stub, [good, good], "appears twice")
    mislabelled = verify_item("other", [1], [-1])
    mislabelled.candidates.request_id = "good"
    expect_invalid(stub, [good, mislabelled], "carries candidates for request 'good'")
    expect_invalid(stub, [good, verify_item("other", [1] * MAX_SEQ_LEN, list(range(-1, MAX_SEQ_LEN - 1)))],
                   "do not fit the context")
    expect_invalid(stub, [good, verify_item("other", [1, 2], [-1, -1], [[1.0] * VOCAB] * 2)], "chains only")
    expect_invalid(stub, [good, verify_item("other", [1], [-1], [[-1.0] * VOCAB])], "non-negative")

    # Both requests continue exactly as if nothing had happened.
    response = stub.Verify(verifier_pb2.VerifyRequest(items=[good, verify_item("other")]), timeout=TIMEOUT_S)
    result = response.results[0]
    assert list(result.accepted_token_ids) == truth[1:3] and result.bonus_token_id == truth[3]
    response = stub.Verify(verifier_pb2.VerifyRequest(items=[verify_item("good", truth[4:6], [-1, 0])]),
                           timeout=TIMEOUT_S)
    assert [*response.results[0].accepted_token_ids, response.results[0].bonus_token_id] == truth[4:7]


def test_prefill_rejects_bad_prompts_without_admitting_anything(stub):
    cases = [
        ({"long": [1] * MAX_SEQ_LEN}, "do not fit the context of 64"),
        ({"empty": []}, "token_ids is empty"),
        ({"oov": [1, VOCAB]}, f"token id {VOCAB} is outside the vocabulary"),
        ({"ok": [1, 2], "ok2": [VOCAB + 1]}, "outside the vocabulary"),  # one bad item fails the batch
    ]
    for prompts, fragment in cases:
        with pytest.raises(grpc.RpcError) as err:
            prefill(stub, prompts)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details(), err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        prefill(stub, {"hot": [1]}, SamplingParams(temperature=-1.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
    info = stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
    assert list(info.active_request_ids) == [] and info.free_slots == MAX_SLOTS

    prefill(stub, {"dup": [1, 2]})
    with pytest.raises(grpc.RpcError) as err:
        prefill(stub, {"dup": [3]})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already admitted" in err.value.details()
    # The longest prompt that fits leaves room for exactly the pending token.
    prefill(stub, {"longest": [1] * (MAX_SEQ_LEN - 1)})
    stub.Verify(verifier_pb2.VerifyRequest(items=[verify_item("longest")]), timeout=TIMEOUT_S)
    expect_invalid(stub, [verify_item("longest")], "reached the context limit")


def test_capacity_release_and_info(stub, checkpoint):
    prefill(stub, {f"r{i}": [i + 1, 2, 3] for i in range(MAX_SLOTS - 1)})
    with pytest.raises(grpc.RpcError) as err:
        prefill(stub, {"x": [1], "y": [2]})
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
    assert info.free_slots == 1 and sorted(info.active_request_ids) == [f"r{i}" for i in range(MAX_SLOTS - 1)]

    released = stub.Release(verifier_pb2.ReleaseRequest(request_ids=["r0", "r1", "nobody"]), timeout=TIMEOUT_S)
    assert released.released == 2
    info = stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
    assert info.free_slots == 3 and "r0" not in info.active_request_ids
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=list(info.active_request_ids)), timeout=TIMEOUT_S)
    info = stub.Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
    assert info.free_slots == MAX_SLOTS and list(info.active_request_ids) == []
    limits = (info.vocab_size, info.max_seq_len, info.max_slots, info.max_batch_size)
    assert limits == (VOCAB, MAX_SEQ_LEN, MAX_SLOTS, 4)
    assert info.hidden_size == TINY_DIMS["hidden_size"] and info.device == "cpu" and info.dtype == "float32"
    assert info.eos_token_id == 2  # no tokenizer in the folder: transformers' LlamaConfig default
    assert info.model == str(checkpoint.resolve())
    # A released id is unknown afterwards.
    expect_invalid(stub, [verify_item("r0")], "unknown request id 'r0'", code=grpc.StatusCode.NOT_FOUND)


def test_verify_batch_limit(stub):
    prefill(stub, {f"b{i}": [i + 1] for i in range(5)})
    expect_invalid(stub, [verify_item(f"b{i}") for i in range(5)], "at most 4")


def test_health_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_config_flags_override_environment_which_overrides_defaults(capsys):
    env = {"SPECDEC_MAX_SLOTS": "3", "SPECDEC_MAX_SEQ_LEN": "9"}
    config = parse_config(["--port", "0", "--max-seq-len", "32"], env=env)
    assert (config.port, config.max_slots, config.max_seq_len) == (0, 3, 32)
    assert config.max_batch_size == VerifierConfig().max_batch_size
    assert parse_config([], env={}) == VerifierConfig()
    assert parse_config([], env={"SPECDEC_WARMUP_TOKENS": "0"}).warmup_tokens == 0
    for argv, message in ((["--max-slots", "0"], "--max-slots must be >= 1, got 0"),
                          (["--warmup-tokens", "-1"], "--warmup-tokens must be >= 0, got -1")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(argv, env={})
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m verifier_svc: error: {message}"


def test_process_serves_and_stops_on_sigterm(checkpoint, tmp_path):
    """`python -m verifier_svc` on port 0: health SERVING, Info reflects flags and env, SIGTERM exits 0."""
    log_file = tmp_path / "verifier.log"
    env = {**os.environ, "SPECDEC_MAX_SLOTS": "3"}
    cmd = [sys.executable, "-m", "verifier_svc", "--port", "0", "--model", str(checkpoint), "--device", "cpu",
           "--max-seq-len", "32", "--torch-threads", "1"]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (found := re.search(r"serving \S+ on 127\.0\.0\.1:(\d+)", log_file.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.2)
        port = int(found.group(1))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            info = verifier_pb2_grpc.VerifierStub(ch).Info(verifier_pb2.VerifierInfoRequest(), timeout=TIMEOUT_S)
            assert (info.max_slots, info.max_seq_len, info.device) == (3, 32, "cpu")
            assert info.free_slots == 3  # the warm-up's scratch slot is back
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0
        assert "verifier_svc config:" in log_file.read_text()
        # Warmed up before serving, capped by the context (--warmup-tokens defaults to 64).
        assert "warmed up batches of 1..32 tokens" in log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)


def test_logprobs_of_every_emitted_token_are_the_targets_raw_log_softmax(stub, reference_runner):
    """Asked at Prefill, every emitted token (first, accepted candidates, bonus) comes with the log-softmax of
    the target's raw logits at its position, and the top-k alternatives, even when sampling with a temperature
    and top-k filter; a request that did not ask gets none."""
    prompt, top = [5, 17, 3, 88, 42, 9], 3
    truth, _ = reference_generate(reference_runner, prompt, 14, SamplingParams())
    # The reference: each position's logits from a plain one-token-at-a-time loop.
    slot = reference_runner.allocate()
    try:
        rows, feed = [], list(prompt)
        for token in truth:
            rows.append(reference_runner.forward([SeqInput(slot, feed, last_logits_only=True)])[0].logits[0])
            feed = [token]
    finally:
        reference_runner.release(slot)
    want = torch.log_softmax(torch.stack(rows).float(), -1)  # [14, V]

    items = [verifier_pb2.PrefillItem(request_id="lp", token_ids=prompt, sampling=sampling_pb(SamplingParams()),
                                      logprobs=True, top_logprobs=top),
             verifier_pb2.PrefillItem(request_id="plain", token_ids=prompt, sampling=sampling_pb(SamplingParams()))]
    response = stub.Prefill(verifier_pb2.PrefillRequest(items=items), timeout=TIMEOUT_S)
    by_id = {r.request_id: r for r in response.results}
    assert not by_id["plain"].HasField("logprobs")
    emitted = [by_id["lp"].logprobs]
    out = [by_id["lp"].next_token_id]
    # A right chain of 3, then a tree whose second branch is right, then a plain decode step.
    steps = [(truth[1:4], [-1, 0, 1]), ([(truth[5] + 1) % VOCAB, truth[5], truth[6]], [-1, -1, 1]), ([], [])]
    for tokens, parents in steps:
        response = stub.Verify(verifier_pb2.VerifyRequest(items=[verify_item("lp", tokens, parents),
                                                                 verify_item("plain")]), timeout=TIMEOUT_S)
        result, plain = response.results
        assert list(plain.logprobs) == []
        step = [*result.accepted_token_ids, result.bonus_token_id]
        assert [lp.token_id for lp in result.logprobs] == step
        out += step
        emitted += list(result.logprobs)
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=["lp", "plain"]), timeout=TIMEOUT_S)
    assert out == truth[: len(out)] and len(out) == 9
    for i, lp in enumerate(emitted):
        assert lp.token_id == out[i]
        assert lp.logprob == pytest.approx(float(want[i, out[i]]), abs=1e-4)
        values, ids = want[i].topk(top)
        assert list(lp.top_token_ids) == ids.tolist()
        assert list(lp.top_logprobs) == pytest.approx(values.tolist(), abs=1e-4)

    # Raw logprobs: the same numbers when the request samples with a temperature and a top-k cut.
    params = SamplingParams(temperature=0.7, top_k=2)
    item = verifier_pb2.PrefillItem(request_id="hot", token_ids=prompt, sampling=sampling_pb(params, 3),
                                    logprobs=True)
    (first,) = stub.Prefill(verifier_pb2.PrefillRequest(items=[item]), timeout=TIMEOUT_S).results
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=["hot"]), timeout=TIMEOUT_S)
    assert first.logprobs.logprob == pytest.approx(float(want[0, first.next_token_id]), abs=1e-4)
    assert list(first.logprobs.top_token_ids) == []
    bad = verifier_pb2.PrefillItem(request_id="bad", token_ids=prompt, logprobs=True, top_logprobs=21)
    with pytest.raises(grpc.RpcError) as err:
        stub.Prefill(verifier_pb2.PrefillRequest(items=[bad]), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in err.value.details()


def test_every_eos_id_the_checkpoint_declares(tmp_path):
    """tokenizer_config's eos token, config.json's and generation_config.json's eos_token_id (ids or lists),
    first seen first, without repeats."""
    import json
    import shutil

    from specdec.model.checkpoint import EMBEDDED_MODELS, load_config
    from verifier_svc.core import checkpoint_eos_token_ids

    folder = make_tiny_checkpoint(tmp_path / "ckpt", "llama", vocab_size=4096, eos_token_id=[7, 0])
    assert checkpoint_eos_token_ids(folder, load_config(folder)) == [7, 0]
    for f in (EMBEDDED_MODELS / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11, 12]}))
    # <|endoftext|> (id 0) is the tokenizer's eos token: it comes first.
    assert checkpoint_eos_token_ids(folder, load_config(folder)) == [0, 7, 11, 12]
