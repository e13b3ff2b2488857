"""The proposer service over real gRPC on loopback: the Propose stream, Info, health, reflection, bad items, the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proposer_svc.base import ProposalRequest
from proposer_svc.config import ProposerConfig
from proposer_svc.ngram import NgramProposer
from proposer_svc.server import SERVICE_NAME, build_proposer, start_server
from specdec.pb import proposer_pb2, proposer_pb2_grpc
from specdec.testing import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 10.0


def item(request_id: str, tokens, budget: int, reset: bool = False) -> proposer_pb2.ProposeItem:
    return proposer_pb2.ProposeItem(request_id=request_id, new_token_ids=tokens, budget=budget, reset=reset)


def candidates(response: proposer_pb2.ProposeResponse) -> list[tuple[str, list[int], list[int]]]:
    return [(c.request_id, list(c.token_ids), list(c.parent_indices)) for c in response.candidates]


async def with_server(scenario, proposer=None) -> None:
    """Run `scenario(stub, channel)` against an in-process proposer service (ngram by default); always stop it."""
    proposer = proposer or NgramProposer(min_n=1, max_n=3, max_budget=4, vocab_size=50)
    running = await start_server(proposer, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT_S)
            await asyncio.wait_for(scenario(proposer_pb2_grpc.ProposerStub(channel), channel), 30)
    finally:
        await running.stop(grace_s=1.0)


async def exchange(call, request: proposer_pb2.ProposeRequest) -> proposer_pb2.ProposeResponse:
    await call.write(request)
    return await asyncio.wait_for(call.read(), TIMEOUT_S)


def test_a_closed_stream_drops_only_the_requests_no_newer_stream_took_over():
    async def scenario(stub, channel):
        old, new = stub.Propose(), stub.Propose()
        await exchange(old, proposer_pb2.ProposeRequest(step_id=1, items=[item("kept", [1, 2, 1], budget=1),
                                                                           item("gone", [3, 4], budget=1)]))
        await exchange(new, proposer_pb2.ProposeRequest(step_id=1, items=[item("kept", [1, 2, 1], reset=True,
                                                                               budget=1)]))
        old.cancel()
        for _ in range(200):
            info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
            if "gone" not in info.active_request_ids:
                break
            await asyncio.sleep(0.01)
        assert list(info.active_request_ids) == ["kept"]
        r = await exchange(new, proposer_pb2.ProposeRequest(step_id=2, items=[item("kept", [2], budget=2)]))
        assert candidates(r) == [("kept", [1, 2], [-1, 0])]  # its state carried on, without a reset
        await new.done_writing()

    asyncio.run(with_server(scenario))


def test_propose_stream_steps_info_and_release():
    async def scenario(stub, channel):
        call = stub.Propose()
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=7, items=[
            item("a", [1, 2, 3, 4, 1, 2], budget=3),
            item("b", [5, 6, 7], budget=0),  # only brings the state up to date: no candidates
            item("c", [9, 8, 9], budget=4),
        ]))
        assert r.step_id == 7
        assert candidates(r) == [("a", [3, 4, 1], [-1, 0, 1]), ("c", [8, 9], [-1, 0])]
        assert r.propose_ms > 0 and r.forward_ms == 0

        # Next step: only the new committed tokens arrive; the state carries the rest.
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=8, items=[
            item("a", [3, 4], budget=2), item("b", [5], budget=9),  # budget capped at max_budget 4
        ]))
        assert r.step_id == 8
        assert candidates(r) == [("a", [1, 2], [-1, 0]), ("b", [6, 7, 5], [-1, 0, 1])]

        info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
        assert info.kind == "ngram" and info.max_budget == 4 and "max_n=3" in info.config
        assert sorted(info.active_request_ids) == ["a", "b", "c"]

        # The peer goes away mid-session: the state of every request its stream sent goes with it (nobody
        # would release it); a new stream rebuilds what it needs from scratch.
        call.cancel()
        for _ in range(200):
            info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
            if not info.active_request_ids:
                break
            await asyncio.sleep(0.01)
        assert list(info.active_request_ids) == []
        call = stub.Propose()
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=9, items=[item("c", [9, 8, 9], reset=True,
                                                                                    budget=2)]))
        assert r.step_id == 9 and candidates(r) == [("c", [8, 9], [-1, 0])]
        info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
        assert list(info.active_request_ids) == ["c"]

        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=10, release_request_ids=["c"]))
        assert r.step_id == 10 and candidates(r) == []
        info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
        assert list(info.active_request_ids) == []
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.OK

    asyncio.run(with_server(scenario))


def test_bad_item_gets_empty_candidates_and_stream_stays_usable():
    async def scenario(stub, channel):
        call = stub.Propose()
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=1, items=[
            item("ok1", [1, 2, 1], budget=2),
            item("bad", [3, 50, 3], budget=2),  # 50 is outside the vocab [0, 50)
            item("neg", [4, 5, 4], budget=-1),  # one Candidates per item with budget > 0: none for it
            item("ok2", [6, 7, 6], budget=1),
        ]))
        assert r.step_id == 1
        assert candidates(r) == [("ok1", [2, 1], [-1, 0]), ("bad", [], []), ("ok2", [7], [-1])]
        # Still usable; "bad" starts afresh from what it brings, "neg" kept its (valid) tokens.
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=2, items=[
            item("bad", [3, 8, 3], budget=2, reset=True), item("neg", [5], budget=1), item("ok1", [2], budget=1),
        ]))
        assert candidates(r) == [("bad", [8, 3], [-1, 0]), ("neg", [4], [-1]), ("ok1", [1], [-1])]
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), TIMEOUT_S) == grpc.StatusCode.OK

    asyncio.run(with_server(scenario))


def test_health_and_reflection():
    async def scenario(stub, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await asyncio.wait_for(call.read(), TIMEOUT_S)
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        await call.done_writing()

    asyncio.run(with_server(scenario))


def test_draft_kind_from_config(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tiny", "llama")
    config = ProposerConfig(kind="draft", model=folder, device="cpu", dtype="float32", max_slots=4, max_seq_len=64,
                            max_budget=3)
    # The same model outside gRPC gives the reference candidates.
    [expected] = build_proposer(config).step([ProposalRequest("a", [1, 2, 3, 4], budget=3)])
    assert len(expected.token_ids) == 3

    async def scenario(stub, channel):
        call = stub.Propose()
        r = await exchange(call, proposer_pb2.ProposeRequest(step_id=5, items=[item("a", [1, 2, 3, 4], budget=5)]))
        assert candidates(r) == [("a", expected.token_ids, [-1, 0, 1])]
        assert 0 < r.forward_ms <= r.propose_ms
        info = await stub.Info(proposer_pb2.ProposerInfoRequest(), timeout=TIMEOUT_S)
        assert info.kind == "draft" and info.max_budget == 3 and str(folder) in info.config
        await call.done_writing()

    asyncio.run(with_server(scenario, build_proposer(config)))
    # An ngram proposer given a model folder checks token ids against that model's vocab.
    assert build_proposer(ProposerConfig(kind="ngram", model=folder)).vocab_size == 97


def test_cli_serves_and_stops_on_sigterm():
    """`python -m proposer_svc` logs its port, reports SERVING, and exits 0 on SIGTERM."""
    env = {**os.environ, "SPECDEC_VOCAB_SIZE": "50"}  # env fallback of --vocab-size
    proc = subprocess.Popen(
        [sys.executable, "-m", "proposer_svc", "--kind", "ngram", "--port", "0", "--torch-threads", "1"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        port, lines, deadline = None, [], time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "".join(lines)
        assert "  vocab_size = 50\n" in lines  # the config is printed at start

        async def check():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=TIMEOUT_S)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                stub = proposer_pb2_grpc.ProposerStub(channel)
                call = stub.Propose()
                r = await exchange(call, proposer_pb2.ProposeRequest(step_id=3, items=[
                    item("x", [1, 2, 1], budget=2), item("y", [60], budget=2)]))
                assert candidates(r) == [("x", [2, 1], [-1, 0]), ("y", [], [])]
                await call.done_writing()

        asyncio.run(check())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT_S)
        proc.stderr.close()


def test_a_draft_runs_one_torch_thread_unless_told_otherwise(monkeypatch):
    from proposer_svc.config import DRAFT_TORCH_THREADS, parse_config

    monkeypatch.delenv("SPECDEC_TORCH_THREADS", raising=False)
    assert parse_config([], env={}) == ProposerConfig()  # the dataclass holds the only defaults
    assert DRAFT_TORCH_THREADS == 1 and parse_config(["--kind", "draft"]).intra_op_threads() == 1
    assert parse_config(["--kind", "draft", "--torch-threads", "2"]).intra_op_threads() == 2
    assert parse_config(["--kind", "ngram"]).intra_op_threads() == 0  # torch's default
    monkeypatch.setenv("SPECDEC_TORCH_THREADS", "3")
    assert parse_config(["--kind", "draft"]).intra_op_threads() == 3
