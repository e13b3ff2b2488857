"""specdec/gguf_convert.py on a tiny GGUF this test writes itself, as llama.cpp's converter would.

A 2-layer Llama with random weights (q/k rows permuted the llama.cpp way, some tensors quantised to Q4_1
and Q8_0) and a small byte-level BPE tokenizer with a chat template. The converted folder must give
transformers and our runner the logits of a transformers model built from the original, unpermuted weights
(the quantised ones as their dequantised values), and tokenise like the tokenizer the vocabulary came from.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specdec.gguf_convert import PROVENANCE_FILE, GGUFConversionError, convert, main, sha256_of, unpermute_rows
from specdec.runner import ModelRunner, SeqInput

DIMS = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, context=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024 and we've got 12 dogs!",
    "def add(a, b):\n    return a + b  # the sum\n\nprint(add(3, 4))",
    "Speculative decoding lets a small model guess and a large model check, token by token.",
    "café naïve résumé — 日本語 😀",
    "In 2020, 2021, 2022 and 2024 we counted 1200, 2200 and 2020 again.",
] * 20
TEXTS = [
    "The lazy fox, 1234567 times: it's odd.",
    "def square(x):\n\treturn x ** 2   # squared\n",
    "naïve café 😀 日本 — ünseen wörds",
    "<|im_start|>user\nhello<|im_end|>\n",
    "   spaces   around   ",
]
RTOL = ATOL = 1e-4


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (the inverse of unpermute_rows)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def train_tokenizer() -> Tokenizer:
    """A byte-level BPE whose merges include digit pairs, set up to split text as llama.cpp does for
    tokenizer.ggml.pre 'smollm': every digit alone first, so those merges must never apply."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    assert any(len(t) > 1 and t.isdigit() for t in tok.get_vocab())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tok


def write_tiny_gguf(path, tok: Tokenizer, *, tied: bool, seed: int = 0, tokenizer_model: str = "gpt2",
                    extra_tensor: str | None = None) -> dict[str, torch.Tensor]:
    """Write the GGUF; return the reference weights (transformers names, HF row order, float32)."""
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    d, f, h, kv = DIMS["hidden"], DIMS["intermediate"], DIMS["heads"], DIMS["kv_heads"]
    head_dim = d // h
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(DIMS["layers"])
    writer.add_context_length(DIMS["context"])
    writer.add_embedding_length(d)
    writer.add_feed_forward_length(f)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)

    reference: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, weight: np.ndarray, qtype=gguf.GGMLQuantizationType.F32, permute_heads=0):
        stored = llama_cpp_permute(weight, permute_heads) if permute_heads else weight
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        # Quantisation blocks run along a row, so it commutes with the row permutation.
        value = gguf.quants.dequantize(gguf.quants.quantize(weight, qtype), qtype).reshape(weight.shape)
        reference[hf_name] = torch.from_numpy(np.array(value, dtype=np.float32))

    Q41, Q80, F16 = (gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16)
    add("token_embd.weight", "model.embed_tokens.weight", rand(len(tokens), d, scale=1.0), Q80)
    for i in range(DIMS["layers"]):
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


def reference_model(reference: dict[str, torch.Tensor], vocab: int, tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=DIMS["hidden"], intermediate_size=DIMS["intermediate"],
                         num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                         num_key_value_heads=DIMS["kv_heads"], max_position_embeddings=DIMS["context"],
                         rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(reference, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_converted_folder_gives_the_reference_logits(tmp_path, tokenizer, tied):
    src = tmp_path / "tiny.gguf"
    reference = write_tiny_gguf(src, tokenizer, tied=tied)
    vocab = tokenizer.get_vocab_size()
    folder = convert(src, tmp_path / "hf32", dtype=torch.float32)
    prompt = torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference_model(reference, vocab, tied)(input_ids=prompt).logits[0]
        converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        torch.testing.assert_close(converted(input_ids=prompt).logits[0], expected, atol=ATOL, rtol=RTOL)
    runner = ModelRunner(folder, device="cpu", dtype="float32", max_slots=1, max_seq_len=64)
    slot = runner.allocate()
    ids = prompt[0].tolist()
    ours = torch.cat([out.logits for out in (runner.forward([SeqInput(slot, ids[:25])])[0],
                                             runner.forward([SeqInput(slot, ids[25:])])[0])])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=RTOL)

    # The default (bf16) folder holds the same values rounded once to bf16.
    weights = load_file(convert(src, tmp_path / "hf16") / "model.safetensors")
    assert set(weights) == set(reference) and ("lm_head.weight" in weights) is not tied
    for name, value in reference.items():
        assert weights[name].dtype == torch.bfloat16
        assert torch.equal(weights[name], value.to(torch.bfloat16)), name


def test_config_and_generation_config_come_from_the_metadata(tmp_path, tokenizer):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tokenizer, tied=True)
    folder = convert(src, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    expected = dict(architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=2, hidden_size=64,
                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    max_position_embeddings=128, rms_norm_eps=1e-5, vocab_size=tokenizer.get_vocab_size(),
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu",
                    attention_bias=False, mlp_bias=False, dtype="bfloat16",
                    rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    assert {k: config.get(k) for k in expected} == expected
    assert json.loads((folder / "generation_config.json").read_text()) == \
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["sha256"] == sha256_of(src) and provenance["source"] == "tiny.gguf"
    assert not (tmp_path / "hf.partial").exists()


def test_tokenizer_tokenises_like_the_vocabulary_it_came_from(tmp_path, tokenizer):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tokenizer, tied=True)
    converted = AutoTokenizer.from_pretrained(convert(src, tmp_path / "hf"))
    for text in TEXTS + CORPUS[:4]:
        ids = converted.encode(text)
        assert ids == tokenizer.encode(text).ids, text
        assert converted.decode(ids) == text
    assert converted.tokenize("2024") == ["2", "0", "2", "4"]
    assert converted.convert_tokens_to_ids(SPECIALS) == [0, 1, 2]
    assert converted.encode("<|im_start|>hi<|im_end|>")[0] == 1 and converted.encode("<|im_end|>") == [2]
    assert (converted.bos_token, converted.eos_token, converted.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    chat = converted.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert converted.decode(converted.encode(chat), skip_special_tokens=True) == "user\n2+2?\nassistant\n"


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    for heads in (1, 2, 8):
        permuted = llama_cpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        assert np.array_equal(unpermute_rows(permuted, heads), weight)


@pytest.mark.parametrize("change, message", [
    (dict(tokenizer_model="llama"), r"tokenizer.ggml.model 'llama' \(a SentencePiece vocabulary\) is not supported"),
    (dict(extra_tensor="rope_freqs.weight"), r"tensor 'rope_freqs.weight' has no Llama counterpart"),
])
def test_what_the_converter_cannot_invert_is_refused(tmp_path, tokenizer, change, message):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tokenizer, tied=True, **change)
    with pytest.raises(GGUFConversionError, match=message):
        convert(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_command_line(tmp_path, tokenizer, capsys):
    src = tmp_path / "tiny.gguf"
    write_tiny_gguf(src, tokenizer, tied=True)
    assert main([str(src), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    assert load_file(tmp_path / "hf" / "model.safetensors")["model.norm.weight"].dtype == torch.float32
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "other")]) == 2
    assert "missing.gguf does not exist" in capsys.readouterr().err
