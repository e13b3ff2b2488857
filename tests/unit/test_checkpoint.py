"""Bad checkpoint folders fail with a message naming the folder and the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from specdec.model import checkpoint
from specdec.model.checkpoint import CODE_DRAFT, CODE_TARGET, CheckpointError, load_tokenizer, validate_checkpoint
from specdec.model.llama import CheckpointLayoutError
from specdec.model.runner import ModelRunner, SeqInput
from specdec.testing import TINY_BPE_CORPUS, make_tiny_checkpoint


@pytest.fixture()
def good(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "good", "llama")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_embedded_models_are_valid():
    for folder in (CODE_TARGET, CODE_DRAFT):
        assert validate_checkpoint(folder) == folder.resolve()
        assert load_tokenizer(folder).eos_token == "<|endoftext|>"


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        ModelRunner(tmp_path / "nowhere")


def test_missing_config(good):
    (good / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"good has no config.json"):
        validate_checkpoint(good)


def test_wrong_architecture(good):
    config = json.loads((good / "config.json").read_text())
    config["model_type"] = "gpt2"
    (good / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported \(supported: llama, mistral, qwen2\)"):
        ModelRunner(good)


def test_missing_weights(good):
    (good / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"good has no model.safetensors or model.safetensors.index.json$"):
        validate_checkpoint(good)


def test_missing_tokenizer(good):
    (good / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no tokenizer \(expected one of tokenizer.json"):
        validate_checkpoint(good)
    # The runner itself needs no tokenizer (a draft may share the target's).
    ModelRunner(good, max_slots=1, max_seq_len=8)


def test_weights_that_do_not_match_the_config(good, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", "llama", num_hidden_layers=1)
    shutil.copy(other / "model.safetensors", good / "model.safetensors")
    with pytest.raises(CheckpointLayoutError, match=r"no tensor 'model.layers.1.self_attn.q_proj.weight'"):
        ModelRunner(good)


def test_verifier_service_refuses_a_bad_folder_at_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "verifier_svc", "--port", "0", "--model", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "missing does not exist" in result.stderr


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(mlp_bias=True), r"config mlp_bias=True is not supported \(the runner's MLP has no biases\)"),
    (dict(qk_norm=True), r"config qk_norm=True is not supported"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4}),
     r"config quantization_config.quant_method='gptq' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                           "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}),
     r"config rope_parameters.rope_type='longrope' is not supported \(supported: default, linear, dynamic"),
    (dict(rope_scaling={"type": "made-up", "factor": 2.0}), r"config rope_scaling.rope_type='made-up' is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     r"config rope_parameters.partial_rotary_factor=0.5 is not supported \(the runner rotates whole heads\)"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 1e5}}),
     r"config rope_parameters=\['full_attention', 'sliding_attention'\] is not supported \(one rope per layer type"),
    (dict(layer_types=["full_attention", "chunked_attention"]), r"config layer_types='chunked_attention' is not supported"),
    (dict(num_key_value_heads=3), r"config num_key_value_heads=3 is not supported \(it does not divide "
                                  r"num_attention_heads=4\)"),
    (dict(head_dim=15), r"config head_dim=15 is not supported \(rotary embeddings need an even head size\)"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_config_fields_the_runner_does_not_implement_are_refused(good, changes, message):
    edit_config(good, **changes)
    with pytest.raises(CheckpointError, match=message) as refused:
        ModelRunner(good)
    assert str(good) in str(refused.value) and "\n" not in str(refused.value)


def test_an_unknown_activation_is_refused(good):
    edit_config(good, hidden_act="swishy")
    with pytest.raises(CheckpointError, match=r"good: config hidden_act='swishy' is not supported"):
        ModelRunner(good)


def add_tensors(folder, **tensors):
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, **tensors}, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj.bias", "model.layers.0.self_attn.q_norm.weight",
                                  "model.layers.0.self_attn.q_proj.bias"])
def test_weights_the_runner_would_leave_out_are_refused(good, name):
    # An MLP bias, a q/k norm, an attention bias that attention_bias=false says is not there.
    add_tensors(good, **{name: torch.ones(4)})
    with pytest.raises(CheckpointLayoutError, match=rf"good: weights hold tensors this llama config does not use: "
                                                    rf"{name}$"):
        ModelRunner(good)


def test_weights_whose_shapes_contradict_the_head_fields_are_refused(good):
    edit_config(good, head_dim=8)  # the weights were made with 64 / 4 = 16
    with pytest.raises(CheckpointLayoutError, match=r"'model.layers.0.self_attn.q_proj.weight' has shape \(64, 64\), "
                                                    r"the config says \(32, 64\) \(.*head_dim=8\)"):
        ModelRunner(good)


def test_declared_attention_biases_must_be_there(good):
    edit_config(good, attention_bias=True)
    with pytest.raises(CheckpointLayoutError, match=r"no tensor 'model.layers.0.self_attn.q_proj.bias'"):
        ModelRunner(good)


def test_what_the_runner_implements_is_not_refused(tmp_path):
    # Llama attention biases (q, k, v and o), a head_dim other than hidden/heads, another activation, pretraining_tp.
    folder = make_tiny_checkpoint(tmp_path / "biased", "llama", attention_bias=True, head_dim=32, hidden_act="gelu",
                                  pretraining_tp=2)
    runner = ModelRunner(folder, device="cpu", dtype="float32", max_slots=1, max_seq_len=32)
    tokens = [5, 17, 3, 96, 40, 2]
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(runner.forward([SeqInput(runner.allocate(), tokens)])[0].logits, expected,
                               atol=1e-4, rtol=1e-4)


def shard(folder, stray: bool):
    """Split model.safetensors into two shards with an index, as save_pretrained does for large models; with
    `stray`, also leave a consolidated.safetensors of other tensor names beside them (as Mistral's repos do)."""
    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in halves.items():
        save_file({n: weights[n] for n in part}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: file for file, part in halves.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()
    if stray:
        save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, folder / "consolidated.safetensors")


def test_the_index_decides_which_files_hold_the_weights(good):
    tokens = [1, 2, 3, 4]
    whole = ModelRunner(good, device="cpu", dtype="float32", max_slots=1, max_seq_len=16)
    expected = whole.forward([SeqInput(whole.allocate(), tokens)])[0].logits
    shard(good, stray=True)
    sharded = ModelRunner(good, device="cpu", dtype="float32", max_slots=1, max_seq_len=16)
    torch.testing.assert_close(sharded.forward([SeqInput(sharded.allocate(), tokens)])[0].logits, expected,
                               atol=0, rtol=0)
    (good / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"good: model.safetensors.index.json names missing files "
                                              r"\['model-00002-of-00002.safetensors'\]"):
        validate_checkpoint(good)
    (good / "model-00001-of-00002.safetensors").unlink()
    (good / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no model.safetensors or model.safetensors.index.json \(found "
                                              r"consolidated.safetensors, which are not read without an index\)"):
        validate_checkpoint(good)


def test_without_an_index_only_model_safetensors_is_read(good):
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, good / "consolidated.safetensors")
    ModelRunner(good, max_slots=1, max_seq_len=8)  # the stray file's tensor would be refused as unused


def sentencepiece_folder(folder):
    """A checkpoint folder whose only tokenizer is a SentencePiece model trained here (Llama-style: byte
    fallback, whitespace kept as it is)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TINY_BPE_CORPUS), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity",
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def test_a_sentencepiece_only_folder_tokenises_like_sentencepiece(good):
    pytest.importorskip("sentencepiece", reason="the 'sentencepiece' extra (part of 'test') is not installed")
    processor = sentencepiece_folder(good)
    tokenizer = load_tokenizer(validate_checkpoint(good))
    # Text that starts with a space is left out: there transformers' LlamaTokenizer drops one of them.
    for text in ["The quick brown fox", "def add(a, b):\n    return 2024", "two  spaces\n\n  inside", "café 😀 ж"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == text


def test_a_sentencepiece_only_folder_says_what_to_install(good, monkeypatch):
    (good / "tokenizer.json").unlink()
    (good / "tokenizer.model").write_bytes(b"not read")
    monkeypatch.setattr(checkpoint, "has_sentencepiece", lambda: False)
    message = (r"good has only a SentencePiece tokenizer \(tokenizer.model\), which needs the sentencepiece package: "
               r"pip install 'sentencepiece==0.2.3' \(specdec's 'sentencepiece' extra\), or add the model's "
               r"tokenizer.json")
    with pytest.raises(CheckpointError, match=message):
        validate_checkpoint(good)
    with pytest.raises(CheckpointError, match=message):
        load_tokenizer(good)
    validate_checkpoint(good, need_tokenizer=False)  # a draft sharing the target's tokenizer still loads
