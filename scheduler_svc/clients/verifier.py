"""A thin async client of the verifier service: Prefill, Verify, Release, Info in plain Python.

Every failure (an RPC error, or an answer that does not cover the requests sent) is raised as a
VerifierError; the engine decides what to do (back off, re-prefill).
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import grpc

from specdec.pb import common_pb2, verifier_pb2, verifier_pb2_grpc
from specdec.rpc.security import ClientTLS, aio_channel
from specdec.contracts import PrefillItem, Timing, TokenLogprobs, VerifierInfo, VerifyItem, VerifyResult
from specdec.model.sampling import SamplingParams
from specdec.telemetry.tracing import client_interceptors

# Draft distributions make Verify requests large (k * vocab floats per request).
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# A restarted service is reached again within RECONNECT_MAX_MS (+20% jitter) of it listening: gRPC's default
# reconnect backoff grows to 120 s, which left the running requests stalled for tens of seconds after a restart.
RECONNECT_MAX_MS = 250
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
]
# Failures that say nothing about the requests in the call: the verifier is unreachable or slow, or full
# for a moment. The engine keeps every request and tries again.
TRANSIENT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED})


class VerifierError(Exception):
    """A verifier call failed; `code` is the gRPC status code (None for a malformed answer)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details or message  # the verifier's own words, for the client of a failed request

    @property
    def is_unavailable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    @property
    def is_transient(self) -> bool:
        """Nothing to do with the requests sent (a malformed answer, code None, counts as the verifier's)."""
        return self.code is None or self.code in TRANSIENT_CODES

    @property
    def lost_state(self) -> bool:
        """The verifier no longer holds a request it was sent (NOT_FOUND: it restarted): re-prefill."""
        return self.code == grpc.StatusCode.NOT_FOUND

    @property
    def may_be_input(self) -> bool:
        """Any other failure may come from one request's own input (an exception while serving it): the
        engine isolates the requests to find whose."""
        return not (self.is_transient or self.lost_state)

    @property
    def request_status(self) -> str:
        """The status a request failed by this error ends with: the verifier's verdict on its input
        (INVALID_ARGUMENT) or a fault while serving it (INTERNAL)."""
        bad_input = self.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
        return "INVALID_ARGUMENT" if bad_input else "INTERNAL"


def logprobs_from_pb(msg: verifier_pb2.TargetLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


def sampling_to_pb(sampling: SamplingParams, seed: int | None) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k)
    if sampling.top_p != 1.0:
        msg.top_p = sampling.top_p
    if seed is not None:
        msg.seed = seed
    return msg


def _timing(msg: verifier_pb2.Timing) -> Timing:
    return Timing(msg.forward_ms, msg.total_ms, msg.batched_tokens, msg.context_tokens, msg.batch_size)


class VerifierClient:
    """Calls one verifier service at `address` (HOST:PORT)."""

    def __init__(self, address: str, timeout_s: float = 120.0, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout_s = timeout_s
        # Calls inside an engine step's span are traced and carry its context to the verifier.
        self._channel = aio_channel(address, tls, options=CHANNEL_OPTIONS, interceptors=client_interceptors())
        self._stub = verifier_pb2_grpc.VerifierStub(self._channel)
        self._seen_state = grpc.ChannelConnectivity.IDLE  # the state reachable() last read

    async def close(self) -> None:
        await self._channel.close()

    def reachable(self, try_to_connect: bool = False) -> bool | None:
        """True when the channel is connected, False when its last attempt failed, None while unknown
        (idle or connecting)."""
        state = self._seen_state = self._channel.get_state(try_to_connect)
        if state == grpc.ChannelConnectivity.READY:
            return True
        if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            return False
        return None

    async def wait_for_state_change(self) -> None:
        """Return once the channel's connectivity state differs from the one reachable() last saw (at once if it
        already does), for a watcher of readiness. Reading the state again here instead would miss a change
        that came in between: a refused connection turns CONNECTING into TRANSIENT_FAILURE within
        microseconds, and a watcher that always saw the first and waited on the second never noticed a
        verifier that was down."""
        await self._channel.wait_for_state_change(self._seen_state)

    async def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the channel is connected (at once if it is), at most timeout_s; returns whether it is."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def info(self, timeout_s: float | None = None) -> VerifierInfo:
        msg = await self._call(self._stub.Info, verifier_pb2.VerifierInfoRequest(), timeout_s)
        return VerifierInfo(
            model=msg.model,
            device=msg.device,
            dtype=msg.dtype,
            vocab_size=msg.vocab_size,
            # A verifier from before the list reports its one id (-1: none).
            eos_token_ids=tuple(msg.eos_token_ids) or ((msg.eos_token_id,) if msg.eos_token_id >= 0 else ()),
            max_seq_len=msg.max_seq_len,
            max_slots=msg.max_slots,
            free_slots=msg.free_slots,
            max_batch_size=msg.max_batch_size,
            active_request_ids=tuple(msg.active_request_ids),
            hidden_size=msg.hidden_size,
        )

    async def prefill(
        self, items: Sequence[PrefillItem], return_hidden: bool = False
    ) -> tuple[dict[str, int], Timing, dict[str, bytes], dict[str, TokenLogprobs]]:
        """Admit requests; returns each one's first sampled token (its pending token) by id, the timing,
        (with return_hidden) each one's hidden state at its last token by id, and the first token's logprobs
        by id for the items that asked."""
        request = verifier_pb2.PrefillRequest(
            items=[
                verifier_pb2.PrefillItem(
                    request_id=i.request_id, token_ids=i.token_ids, sampling=sampling_to_pb(i.sampling, i.seed),
                    logprobs=i.logprobs, top_logprobs=i.top_logprobs,
                )
                for i in items
            ],
            return_hidden=return_hidden,
        )
        msg = await self._call(self._stub.Prefill, request)
        first = {r.request_id: r.next_token_id for r in msg.results}
        self._check_covered("Prefill", [i.request_id for i in items], first)
        hidden = {r.request_id: r.hidden_state for r in msg.results if r.hidden_state}
        logprobs = {r.request_id: logprobs_from_pb(r.logprobs) for r in msg.results if r.HasField("logprobs")}
        return first, _timing(msg.timing), hidden, logprobs

    async def verify(
        self, items: Sequence[VerifyItem], return_hidden: bool = False
    ) -> tuple[dict[str, VerifyResult], Timing]:
        """One engine step for a ragged batch; returns accepted tokens and the bonus token by id."""
        request = verifier_pb2.VerifyRequest(return_hidden=return_hidden)
        for item in items:
            entry = request.items.add(request_id=item.request_id)
            if item.candidates is not None:
                cand = item.candidates
                entry.candidates.token_ids.extend(cand.tokens)
                entry.candidates.parent_indices.extend(cand.parents)
                for probs in cand.distributions:
                    entry.candidates.draft_distributions.add().probs.extend(probs)
        msg = await self._call(self._stub.Verify, request)
        outputs = {
            r.request_id: VerifyResult(r.request_id, tuple(r.accepted_token_ids), r.bonus_token_id,
                                       tuple(r.accepted_indices), r.hidden_state,
                                       tuple(logprobs_from_pb(lp) for lp in r.logprobs))
            for r in msg.results
        }
        self._check_covered("Verify", [i.request_id for i in items], outputs)
        return outputs, _timing(msg.timing)

    async def release(self, request_ids: Sequence[str]) -> int:
        """Free the verifier state of these requests (unknown ids are ignored); returns how many held state."""
        msg = await self._call(self._stub.Release, verifier_pb2.ReleaseRequest(request_ids=request_ids))
        return msg.released

    async def _call(self, method, request, timeout_s: float | None = None):
        try:
            return await method(request, timeout=timeout_s or self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise VerifierError(
                f"verifier {self.address} {type(request).__name__}: {exc.code().name}: {exc.details()}", exc.code(),
                exc.details() or ""
            ) from exc

    def _check_covered(self, rpc: str, sent: list[str], got: dict) -> None:
        missing = [rid for rid in sent if rid not in got]
        if missing:
            raise VerifierError(f"verifier {self.address} {rpc} answered without results for {missing[:3]}")
