"""specdec/model/gguf_convert.py on a tiny GGUF this test writes itself, as llama.cpp's converter would.

A 2-layer Llama with random weights (q/k rows permuted the llama.cpp way, some tensors quantised to Q4_1
and Q8_0) and a small byte-level BPE tokenizer with a chat template. The converted folder must give
transformers and our runner the logits of a transformers model built from the original, unpermuted weights
(the quantised ones as their dequantised values), and tokenise like the tokenizer the vocabulary came from.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specdec.model.gguf_convert import PROVENANCE_FILE, GGUFConversionError, convert, main, sha256_of, unpermute_rows
from specdec.model.runner import ModelRunner, SeqInput
from specdec.testing import (TINY_BPE_CORPUS, TINY_GGUF_DIMS, TINY_GGUF_SPECIALS, llama_cpp_permute, train_tiny_bpe,
                             write_tiny_gguf)

TEXTS = [
    "The lazy fox, 1234567 times: it's odd.",
    "def square(x):\n\treturn x ** 2   # squared\n",
    "naïve café 😀 日本 — ünseen wörds",
    "<|im_start|>user\nhello<|im_end|>\n",
    "   spaces   around   ",
]
RTOL = ATOL = 1e-4
DIMS = TINY_GGUF_DIMS


def reference_model(reference: dict[str, torch.Tensor], vocab: int, tied: bool) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=DIMS["hidden"], intermediate_size=DIMS["intermediate"],
                         num_hidden_layers=DIMS["layers"], num_attention_heads=DIMS["heads"],
                         num_key_value_heads=DIMS["kv_heads"], max_position_embeddings=DIMS["context"],
                         rope_parameters={"rope_type": "default", "rope_theta": DIMS["rope_theta"]}, rms_norm_eps=1e-5,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(reference, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if tied:
        model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_bpe()


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
    for text in TEXTS + TINY_BPE_CORPUS[:5]:
        ids = converted.encode(text)
        assert ids == tokenizer.encode(text).ids, text
        assert converted.decode(ids) == text
    assert converted.tokenize("2024") == ["2", "0", "2", "4"]
    assert converted.convert_tokens_to_ids(TINY_GGUF_SPECIALS) == [0, 1, 2]
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
