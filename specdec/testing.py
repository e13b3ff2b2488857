"""Helpers shared by the test suite and benchmarks: tiny random checkpoints of each architecture."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

TINY_DIMS = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_tiny_checkpoint(folder: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight fp32 checkpoint of `arch` (llama, mistral or qwen2) into `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config
    from transformers import Qwen2ForCausalLM

    dims = {**TINY_DIMS, **overrides}
    if arch == "llama":
        config, cls = LlamaConfig(**dims, tie_word_embeddings=False), LlamaForCausalLM
    elif arch == "mistral":
        # A short window so that tests cross it.
        config, cls = MistralConfig(**{"sliding_window": 16, **dims}), MistralForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(**dims, tie_word_embeddings=True), Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    # Random init gives near-uniform logits; scale up so argmax and acceptance are meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_stack_checkpoints(root: Path, eos_token_id: int = 0) -> tuple[Path, Path]:
    """A tiny random llama target with the real (embedded) tokenizer in root/target, and a draft in
    root/draft made from the target's weights plus noise (often, not always, right about the target).

    For stacks started by tests: loads in a second and runs a step in milliseconds on a CPU.
    eos_token_id 0 is <|endoftext|> of the embedded tokenizer.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from specdec.checkpoint import EMBEDDED_MODELS

    target = make_tiny_checkpoint(root / "target", "llama", vocab_size=4096, max_position_embeddings=512,
                                  eos_token_id=eos_token_id, bos_token_id=eos_token_id)
    draft = root / "draft"
    shutil.copytree(target, draft)
    weights = load_file(draft / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    save_file({k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
              draft / "model.safetensors", metadata={"format": "pt"})
    for folder in (target, draft):
        for f in (EMBEDDED_MODELS / "tokenizer").iterdir():
            shutil.copy(f, folder / f.name)
    return target, draft


@torch.inference_mode()
def exact_topk_distribution(model, prompt: list[int], temperature: float, top_k: int,
                            n_tokens: int) -> dict[tuple[int, ...], float]:
    """The exact probability of every completion of `n_tokens` tokens that temperature + top-k sampling from
    `model` (a transformers causal LM) can produce after `prompt`, enumerated path by path."""
    exact: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n_tokens):
        nxt = {}
        for path, p in exact.items():
            logits = model(input_ids=torch.tensor([prompt + list(path)])).logits[0, -1].double() / temperature
            keep = logits.topk(top_k).indices
            probs = torch.softmax(logits[keep], dim=-1)
            for t, q in zip(keep.tolist(), probs.tolist()):
                nxt[path + (t,)] = p * q
        exact = nxt
    return exact


# Chi-square critical values at significance alpha = 0.001, by degrees of freedom.
CHI2_CRITICAL_0_001 = {
    1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124, 9: 27.877,
    10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697, 16: 39.252, 17: 40.790,
    18: 42.312, 19: 43.820, 20: 45.315, 21: 46.797, 22: 48.268, 23: 49.728, 24: 51.179, 25: 52.620,
    26: 54.052, 27: 55.476, 28: 56.892, 29: 58.301, 30: 59.703,
}


def chi_square_passes(
    observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 0.0
) -> tuple[bool, float, int]:
    """Pearson's test of observed counts against expected probabilities at alpha = 0.001.

    Cells with expected probability 0 must be empty (else the check fails outright) and are left out
    of the degrees of freedom. Cells whose expected count is below `min_expected` are pooled into one
    cell, so that the chi-square approximation holds for small samples. Returns (passes, statistic, df).
    """
    observed, expected_probs = observed.double().flatten(), expected_probs.double().flatten()
    impossible = expected_probs == 0
    if observed[impossible].sum() > 0:
        return False, float("inf"), -1
    observed, expected = observed[~impossible], expected_probs[~impossible] * observed.sum()
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum().view(1)])
        expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    return stat < CHI2_CRITICAL_0_001[df], stat, df


class OtlpCollector:
    """An OTLP/gRPC trace collector on loopback that keeps every span it receives, for tests.

    `spans()` returns them as plain dicts: service (the resource's service.name), name, kind, trace_id,
    span_id, parent_id (hex; "" for a root), attributes (a dict) and links (span ids, hex).
    """

    def __init__(self) -> None:
        import threading
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self
        self._lock = threading.Lock()
        self._spans: list[dict] = []

        class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                collector._add(request)
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _add(self, request) -> None:
        new = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    new.append({
                        "service": resource.get("service.name", ""),
                        "name": span.name,
                        "kind": type(span).SpanKind.Name(span.kind),  # SPAN_KIND_SERVER, ...
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_id": span.parent_span_id.hex(),
                        "attributes": {a.key: _any_value(a.value) for a in span.attributes},
                        "links": [link.span_id.hex() for link in span.links],
                    })
        with self._lock:
            self._spans.extend(new)

    def spans(self) -> list[dict]:
        with self._lock:
            return list(self._spans)

    def stop(self) -> None:
        self._server.stop(grace=None)


def _any_value(value):
    """An OTLP AnyValue as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def make_tiny_medusa_heads(target_folder: Path, out: Path, num_heads: int = 3, steps: int = 200,
                           seed: int = 0) -> Path:
    """Medusa heads for a tiny test target (e.g. from make_tiny_checkpoint / make_tiny_stack_checkpoints),
    saved into `out`: trained for a few seconds on the target's own greedy continuations (40 tokens) of
    random prompts (`tiny_medusa_prompts(vocab_size, seed)`), so that their guesses are often accepted
    and end-to-end tests exercise tree acceptance. steps=0 leaves the lm_head-copy initialisation."""
    from specdec.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
    from specdec.medusa_train import fit_heads, greedy_rollouts, head_examples
    from specdec.runner import ModelRunner

    runner = ModelRunner(target_folder, device="cpu", dtype=torch.float32, max_slots=32,
                         max_seq_len=TINY_MEDUSA_PROMPT[1] + TINY_MEDUSA_NEW_TOKENS)
    prompts = tiny_medusa_prompts(runner.vocab_size, seed)
    x, y = head_examples(greedy_rollouts(runner, prompts, TINY_MEDUSA_NEW_TOKENS, batch_size=32), num_heads)
    config = MedusaConfig(hidden_size=runner.weights.hidden_size, vocab_size=runner.vocab_size,
                          num_heads=num_heads, target=Path(target_folder).name)
    torch.manual_seed(seed)
    heads = MedusaHeads(config)
    heads.init_from_lm_head(runner.weights.lm_head.weight.float())
    if steps > 0:
        fit_heads(heads, x, y, steps=steps, lr=3e-3, batch_size=256, seed=seed)
    save_medusa_heads(heads, out)
    return Path(out)


TINY_MEDUSA_PROMPT = (128, 8)  # prompts x tokens the tiny heads are trained on
TINY_MEDUSA_NEW_TOKENS = 40


def tiny_medusa_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """The random prompts make_tiny_medusa_heads trains on (uniform token ids, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, TINY_MEDUSA_PROMPT, generator=gen).tolist()


def logits_alone_and_in_chains(runner, prompt: list[int], max_tokens: int, chains: Sequence[int],
                               ) -> tuple[list[int], list[torch.Tensor], dict[int, list[torch.Tensor]]]:
    """Greedy-decode `max_tokens` tokens after `prompt` one per forward through a ModelRunner, then re-run
    the same tokens from the same context in chains of each length in `chains` (a verifier step's shape).
    Returns (the decoded tokens, their one-at-a-time logits, {chain: the chained logits}); logits row j
    is scored after token j, so its argmax is token j + 1 (the slot is released at the end)."""
    from specdec.runner import SeqInput

    slot = runner.allocate()
    try:
        token = int(runner.forward([SeqInput(slot, prompt)])[0].logits[-1].argmax())
        tokens, alone = [], []
        for _ in range(max_tokens):
            tokens.append(token)
            logits = runner.forward([SeqInput(slot, [token])])[0].logits[-1]
            alone.append(logits)
            token = int(logits.argmax())
        chained = {}
        for chain in chains:
            runner.truncate(slot, len(prompt))
            chained[chain] = [row for i in range(0, max_tokens, chain)
                              for row in runner.forward([SeqInput(slot, tokens[i : i + chain])])[0].logits]
        return tokens, alone, chained
    finally:
        runner.release(slot)
