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

    from specdec.model.checkpoint import EMBEDDED_MODELS

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
    from specdec.model.medusa import MedusaConfig, MedusaHeads, save_medusa_heads
    from specdec.training.medusa_train import fit_heads, greedy_rollouts, head_examples
    from specdec.model.runner import ModelRunner

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
    from specdec.model.runner import SeqInput

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


# A tiny Llama GGUF written the way llama.cpp's converter writes one (specdec/model/gguf_convert.py's tests and the
# default model's install step are tested on it).
TINY_GGUF_DIMS = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, context=128, rope_theta=50000.0)
TINY_GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_GGUF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TINY_BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 12 dogs!",
    "def add(a, b):\n    return a + b  # the sum\n\nprint(add(3, 4))",
    "Speculative decoding lets a small model guess and a large model check, token by token.",
    "café naïve résumé — 日本語 😀",
    "In 2020, 2021, 2022 and 2024 we counted 1200, 2200 and 2020 again.",
] * 20


def llama_cpp_permute(weight, n_heads: int):
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows [n_heads * head_dim, in]
    (the inverse of specdec.model.gguf_convert.unpermute_rows)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def train_tiny_bpe():
    """A byte-level BPE (a `tokenizers.Tokenizer`) whose merges include digit pairs, set up to split text as
    llama.cpp does for tokenizer.ggml.pre 'smollm': every digit alone first, so those merges never apply."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=TINY_GGUF_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_BPE_CORPUS, trainer)
    assert any(len(t) > 1 and t.isdigit() for t in tok.get_vocab())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def write_tiny_gguf(path: Path, tok, *, tied: bool, seed: int = 0, tokenizer_model: str = "gpt2",
                    extra_tensor: str | None = None) -> dict[str, torch.Tensor]:
    """Write a 2-layer random Llama with tokenizer `tok` (train_tiny_bpe) as a GGUF file at `path`: q/k rows
    permuted as llama.cpp does, q/o/down projections in Q4_1, the embedding and gate in Q8_0, v and the
    untied output in F16, the rest F32. Returns the reference weights: transformers names, rows in
    transformers' order, float32, each quantised tensor as its dequantised values."""
    import json

    import gguf
    import numpy as np

    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    dims = TINY_GGUF_DIMS
    d, f, h, kv = dims["hidden"], dims["intermediate"], dims["heads"], dims["kv_heads"]
    head_dim = d // h
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(dims["layers"])
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(dims["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in TINY_GGUF_SPECIALS else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TINY_GGUF_TEMPLATE)

    Q41, Q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    reference: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, weight, qtype=F32, permute_heads: int = 0):
        stored = gguf.quants.quantize(llama_cpp_permute(weight, permute_heads) if permute_heads else weight, qtype)
        writer.add_tensor(gguf_name, stored, raw_dtype=None if qtype in (F32, F16) else qtype)
        # Quantisation blocks run along a row, so quantising commutes with the row permutation.
        value = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(weight.shape)
        reference[hf_name] = torch.from_numpy(np.array(value, dtype=np.float32))

    add("token_embd.weight", "model.embed_tokens.weight", rand(len(tokens), d, scale=1.0), Q80)
    for i in range(dims["layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", 1 + rand(d, scale=0.1))
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", rand(h * head_dim, d), Q41, permute_heads=h)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", rand(kv * head_dim, d), permute_heads=kv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", rand(kv * head_dim, d), F16)
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", rand(d, h * head_dim), Q41)
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + rand(d, scale=0.1))
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", rand(f, d), Q80)
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", rand(f, d))
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", rand(d, f), Q41)
    add("output_norm.weight", "model.norm.weight", 1 + rand(d, scale=0.1))
    if not tied:
        add("output.weight", "lm_head.weight", rand(len(tokens), d, scale=1.0), F16)
    if extra_tensor:
        add(extra_tensor, extra_tensor, rand(head_dim // 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return reference
