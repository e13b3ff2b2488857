"""In-process fakes of the verifier and proposer services for the scheduler tests, and a harness.

The fake "model" is a fixed rule: the token after t is (7 t + 3) mod V. The fake verifier keeps the
protocol's cache invariant (committed tokens + a pending token) and verifies candidate trees against
the rule; fake proposers propose by the same rule, deliberately wrong in places, or misbehave on
purpose. The tests at the bottom check the fakes themselves, since every scheduler test leans on them.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

import grpc
import tokenizers

from scheduler_svc.config import ProposerAddress, SchedulerConfig
from scheduler_svc.server import SchedulerServer, start_server
from specdec.pb import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    proposer_pb2,
    proposer_pb2_grpc,
    verifier_pb2,
    verifier_pb2_grpc,
)

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "models" / "tokenizer"
VOCAB = 4096  # the embedded tokenizer's vocabulary, so that generated ids decode to text
EOS = 0  # <|endoftext|> in the embedded tokenizer


def next_token(t: int, vocab: int = VOCAB) -> int:
    """The fake model: the greedy token after t."""
    return (7 * t + 3) % vocab


def reference(prompt: list[int], max_tokens: int, eos: int | None = EOS) -> tuple[list[int], str]:
    """What target-only greedy decoding gives: (output tokens, finish reason name)."""
    out, t = [], prompt[-1]
    while len(out) < max_tokens:
        t = next_token(t)
        if t == eos:
            return out, "FINISH_REASON_EOS"
        out.append(t)
    return out, "FINISH_REASON_LENGTH"


def fake_logprob(token: int) -> float:
    """The fake verifier's log-probability of a token: a fixed function of it, so tests know what to expect."""
    return -0.5 - (token % 5) / 10


def fake_top(token: int, k: int) -> list[tuple[int, float]]:
    """The fake verifier's top-k alternatives at the position of `token`."""
    return [((token + j) % VOCAB, -0.1 * (j + 1)) for j in range(k)]


def token_before(t: int) -> int:
    """The token whose successor is t (7 is invertible mod 4096)."""
    return ((t - 3) * pow(7, -1, VOCAB)) % VOCAB


class FastTokenizer:
    """The embedded tokenizer through the `tokenizers` library (skips importing transformers in tests)."""

    def __init__(self, path: Path = TOKENIZER_DIR / "tokenizer.json") -> None:
        self.backend_tokenizer = tokenizers.Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=True)


TOKENIZER = FastTokenizer()


# -- fake verifier ---------------------------------------------------------------------------------


class FakeVerifier(verifier_pb2_grpc.VerifierServicer):
    """Implements the verifier protocol over the fake model, with knobs to make it fail."""

    def __init__(self, *, max_seq_len: int = 128, max_slots: int = 8, max_batch_size: int = 8,
                 model: str = "", verify_delay_s: float = 0.0, eos_token_ids: tuple[int, ...] = (EOS,)) -> None:
        self.max_seq_len, self.max_slots, self.max_batch_size = max_seq_len, max_slots, max_batch_size
        self.model = model
        self.eos_token_ids = eos_token_ids
        self.top_logprobs: dict[str, int] = {}  # requests that asked for logprobs -> their top-k
        self.verify_delay_s = verify_delay_s
        self.seqs: dict[str, list[int]] = {}  # committed tokens; the last one is pending (not cached)
        self.prefilled: list[str] = []
        self.sampling: dict[str, common_pb2.SamplingParams] = {}
        self.released: list[str] = []
        self.verify_batches: list[dict[str, int]] = []  # per Verify call: request id -> candidate count
        self.fail_verifies = 0  # the next N Verify calls fail with UNAVAILABLE
        self.forget_on_next_verify = False  # simulate a restart: drop every request's state
        # A request whose prompt holds this token crashes the call that serves it, as an input no check
        # foresaw would (the handler raises: gRPC answers UNKNOWN): in Prefill, and in Verify unless
        # poison_prefill is False (then only its Verify calls crash).
        self.poison_token: int | None = None
        self.poison_prefill = True
        self.poisoned_calls = 0

    def _poisoned(self, token_lists) -> bool:
        if self.poison_token is None or not any(self.poison_token in tokens for tokens in token_lists):
            return False
        self.poisoned_calls += 1
        return True

    async def Prefill(self, request, context):
        if self.poison_prefill and self._poisoned([list(item.token_ids) for item in request.items]):
            raise RuntimeError("injected crash on a poisoned prompt")
        for item in request.items:
            if item.request_id in self.seqs:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request {item.request_id} already holds a slot")
            if any(not 0 <= t < VOCAB for t in item.token_ids) or not item.token_ids:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad token ids")
            if len(item.token_ids) > self.max_seq_len:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt longer than the context")
        if len(self.seqs) + len(request.items) > self.max_slots:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot")
        results = []
        for item in request.items:
            tokens = list(item.token_ids)
            self.seqs[item.request_id] = tokens + [next_token(tokens[-1])]
            self.prefilled.append(item.request_id)
            self.sampling[item.request_id] = item.sampling
            result = verifier_pb2.PrefillResult(request_id=item.request_id, next_token_id=self.seqs[item.request_id][-1])
            if item.logprobs:
                self.top_logprobs[item.request_id] = item.top_logprobs
                result.logprobs.CopyFrom(self._logprobs(result.next_token_id, item.top_logprobs))
            results.append(result)
        return verifier_pb2.PrefillResponse(results=results, timing=verifier_pb2.Timing(forward_ms=1.0, total_ms=1.5))

    async def Verify(self, request, context):
        if self.verify_delay_s:
            await asyncio.sleep(self.verify_delay_s)
        if self.forget_on_next_verify:
            self.forget_on_next_verify = False
            self.seqs.clear()
        if self.fail_verifies > 0:
            self.fail_verifies -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
        if len(request.items) > self.max_batch_size:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "batch too large")
        for item in request.items:  # check everything before changing anything
            seq = self.seqs.get(item.request_id)
            if seq is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown request {item.request_id}")
            cand = item.candidates
            if len(cand.parent_indices) != len(cand.token_ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "parents/tokens length mismatch")
            if any(not -1 <= p < j for j, p in enumerate(cand.parent_indices)):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad parent index")
            if any(not 0 <= t < VOCAB for t in cand.token_ids):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "candidate outside the vocabulary")
            # Cached tokens (all but the pending one) + pending + candidates must fit the context.
            if len(seq) + len(cand.token_ids) > self.max_seq_len:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "context exceeded")
        if self._poisoned([self.seqs[item.request_id] for item in request.items]):
            raise RuntimeError("injected crash on a poisoned request")
        self.verify_batches.append({i.request_id: len(i.candidates.token_ids) for i in request.items})
        results = []
        for item in request.items:
            seq = self.seqs[item.request_id]
            accepted, indices = accept_path(seq[-1], item.candidates)
            bonus = next_token(accepted[-1] if accepted else seq[-1])
            seq.extend(accepted + [bonus])
            result = verifier_pb2.VerifyResult(request_id=item.request_id, accepted_token_ids=accepted,
                                               accepted_indices=indices, bonus_token_id=bonus)
            if item.request_id in self.top_logprobs:
                top = self.top_logprobs[item.request_id]
                result.logprobs.extend(self._logprobs(t, top) for t in [*accepted, bonus])
            results.append(result)
        timing = verifier_pb2.Timing(forward_ms=2.0, total_ms=2.5, batch_size=len(request.items))
        return verifier_pb2.VerifyResponse(results=results, timing=timing)

    @staticmethod
    def _logprobs(token: int, top: int) -> verifier_pb2.TargetLogprobs:
        alternatives = fake_top(token, top)
        return verifier_pb2.TargetLogprobs(token_id=token, logprob=fake_logprob(token),
                                           top_token_ids=[t for t, _ in alternatives],
                                           top_logprobs=[v for _, v in alternatives])

    async def Release(self, request, context):
        n = 0
        for rid in request.request_ids:
            self.released.append(rid)
            self.top_logprobs.pop(rid, None)
            n += self.seqs.pop(rid, None) is not None
        return verifier_pb2.ReleaseResponse(released=n)

    async def Info(self, request, context):
        return verifier_pb2.VerifierInfo(
            model=self.model, device="cpu", dtype="float32", vocab_size=VOCAB,
            eos_token_id=self.eos_token_ids[0] if self.eos_token_ids else -1, eos_token_ids=self.eos_token_ids,
            max_seq_len=self.max_seq_len, max_slots=self.max_slots, free_slots=self.max_slots - len(self.seqs),
            max_batch_size=self.max_batch_size, active_request_ids=list(self.seqs), hidden_size=8,
        )


def accept_path(pending: int, cand: common_pb2.Candidates) -> tuple[list[int], list[int]]:
    """Greedy tree verification under the fake model: the longest root path the rule agrees with."""
    accepted, indices, node, last = [], [], -1, pending
    while True:
        want = next_token(last)
        child = next((j for j, (t, p) in enumerate(zip(cand.token_ids, cand.parent_indices))
                      if p == node and t == want), None)
        if child is None:
            return accepted, indices
        accepted.append(want)
        indices.append(child)
        node, last = child, want


# -- fake proposer ---------------------------------------------------------------------------------


class FakeProposer(proposer_pb2_grpc.ProposerServicer):
    """Proposes by the fake model's rule; `mode` picks how it (mis)behaves.

    good: always right. mixed: right for a varying prefix, then wrong. garbage_step: wrong step_id.
    garbage_vocab: a token outside the vocabulary. over_budget: one node more than asked. bad_parents:
    a parent index pointing forward. die: the stream fails. hang: never answers.
    """

    def __init__(self, mode: str = "mixed", *, max_budget: int = 8, misbehave_from_step: int = 2) -> None:
        self.mode = mode
        self.max_budget = max_budget
        self.misbehave_from_step = misbehave_from_step  # the first steps are fine, to test recovery paths
        self.history: dict[str, list[int]] = {}
        self.requests: list[proposer_pb2.ProposeRequest] = []
        self.released: list[str] = []
        self.history_at_release: dict[str, list[int]] = {}
        self.streams = 0

    async def Propose(self, request_iterator, context):
        self.streams += 1
        async for req in request_iterator:
            self.requests.append(req)
            for rid in req.release_request_ids:
                self.released.append(rid)
                if rid in self.history:
                    self.history_at_release[rid] = self.history.pop(rid)
            candidates = []
            for item in req.items:
                if item.reset or item.request_id not in self.history:
                    self.history[item.request_id] = list(item.new_token_ids)
                else:
                    self.history[item.request_id].extend(item.new_token_ids)
                if item.budget > 0:
                    candidates.append(self._propose(item.request_id, item.budget))
            misbehave = len(self.requests) >= self.misbehave_from_step
            step_id = req.step_id
            if misbehave and self.mode == "die":
                await context.abort(grpc.StatusCode.INTERNAL, "injected crash")
            if misbehave and self.mode == "hang":
                await asyncio.sleep(3600)
            if misbehave and candidates:
                if self.mode == "garbage_step":
                    step_id += 7
                elif self.mode == "garbage_vocab":
                    candidates[0].token_ids[0] = VOCAB + 5
                elif self.mode == "over_budget":
                    candidates[0].token_ids.append(1)
                    candidates[0].parent_indices.append(len(candidates[0].parent_indices) - 1)
                elif self.mode == "bad_parents":
                    candidates[0].parent_indices[0] = 0
            yield proposer_pb2.ProposeResponse(step_id=step_id, candidates=candidates, propose_ms=0.5)

    def _propose(self, rid: str, budget: int) -> common_pb2.Candidates:
        history = self.history[rid]
        right = budget if self.mode != "mixed" else len(history) % (budget + 1)
        tokens, t = [], history[-1]
        for j in range(budget):
            t = next_token(t)
            tokens.append(t if j < right else (t + 1) % VOCAB)
        return common_pb2.Candidates(request_id=rid, token_ids=tokens, parent_indices=list(range(-1, budget - 1)))

    async def Info(self, request, context):
        return proposer_pb2.ProposerInfo(kind="fake", config=self.mode, max_budget=self.max_budget,
                                         active_request_ids=list(self.history))


# -- harness ---------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve_fake(servicer, add_fn, port: int = 0):
    """Serve one fake on 127.0.0.1 (a free port unless given); yields (server, 'HOST:PORT')."""
    server = grpc.aio.server()
    add_fn(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield server, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@dataclass
class Cluster:
    verifier: FakeVerifier
    proposers: dict[str, FakeProposer]
    proposer_servers: dict[str, grpc.aio.Server]
    scheduler: SchedulerServer
    stub: generation_pb2_grpc.GenerationStub
    channel: grpc.aio.Channel
    verifier_server: grpc.aio.Server

    @property
    def engine(self):
        return self.scheduler.scheduler.engine


@contextlib.asynccontextmanager
async def cluster(verifier: FakeVerifier | None = None, proposers: dict[str, FakeProposer] | None = None,
                  tokenizer=TOKENIZER, wait_ready: bool = True, extra_proposers: tuple = (), **config):
    """A fake verifier and proposers, and a real scheduler in front of them, all in this process."""
    verifier = verifier or FakeVerifier()
    proposers = {"fake": FakeProposer()} if proposers is None else proposers
    async with contextlib.AsyncExitStack() as stack:
        verifier_server, vaddr = await stack.enter_async_context(
            serve_fake(verifier, verifier_pb2_grpc.add_VerifierServicer_to_server))
        servers, addresses = {}, []
        for name, fake in proposers.items():
            server, addr = await stack.enter_async_context(
                serve_fake(fake, proposer_pb2_grpc.add_ProposerServicer_to_server))
            servers[name] = server
            addresses.append(ProposerAddress(name, addr))
        # The fixed policy unless a test asks for another: most tests count candidates per step.
        settings = dict(verifier=vaddr, proposers=(*addresses, *extra_proposers), port=0, proposer_timeout_s=2.0,
                        proposer_backoff_s=0.05, verifier_backoff_max_s=0.1, grace_s=0.0, policy="fixed")
        settings.update(config)
        sched = await start_server(SchedulerConfig(**settings), tokenizer)
        stack.push_async_callback(sched.stop, 0)
        if wait_ready:
            await asyncio.wait_for(sched.scheduler.ready.wait(), 10)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{sched.port}")
        stack.push_async_callback(channel.close)
        yield Cluster(verifier, proposers, servers, sched, generation_pb2_grpc.GenerationStub(channel), channel,
                      verifier_server)


async def generate(stub, **fields) -> tuple[list[int], str, str, generation_pb2.GenerationStats, int]:
    """Stream one request; returns (tokens, text, finish reason name, stats, messages received)."""
    tokens, text, messages, last = [], [], 0, None
    async for msg in stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=20):
        tokens.extend(msg.token_ids)
        text.append(msg.text)
        messages += 1
        last = msg
    return tokens, "".join(text), generation_pb2.FinishReason.Name(last.finish_reason), last.stats, messages


def run(coro, timeout_s: float = 30.0):
    """Run an async test body with a hard bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


# -- tests of the fakes ----------------------------------------------------------------------------


def test_fake_verifier_accepts_the_rule_path_of_a_tree():
    pending = 5
    a, b = next_token(pending), next_token(next_token(pending))
    # Node 0 is wrong, node 1 right (sibling of 0), node 2 right under node 1, node 3 wrong under 2.
    cand = common_pb2.Candidates(token_ids=[a + 1, a, b, 9], parent_indices=[-1, -1, 1, 2])
    assert accept_path(pending, cand) == ([a, b], [1, 2])
    assert accept_path(pending, common_pb2.Candidates()) == ([], [])


def test_reference_stops_at_eos_and_token_before_inverts_the_rule():
    t = token_before(EOS)
    assert next_token(t) == EOS
    assert reference([token_before(t)], 10) == ([t], "FINISH_REASON_EOS")
    out, reason = reference([11], 5)
    assert len(out) == 5 and reason == "FINISH_REASON_LENGTH" and out[0] == next_token(11)
