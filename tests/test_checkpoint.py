"""Bad checkpoint folders fail with a message naming the folder and the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from specdec.checkpoint import DEFAULT_DRAFT, DEFAULT_TARGET, CheckpointError, load_tokenizer, validate_checkpoint
from specdec.llama import CheckpointLayoutError
from specdec.runner import ModelRunner
from specdec.testing import make_tiny_checkpoint


@pytest.fixture()
def good(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "good", "llama")
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_embedded_models_are_valid():
    for folder in (DEFAULT_TARGET, DEFAULT_DRAFT):
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
    with pytest.raises(CheckpointError, match=r"has no \*.safetensors weights"):
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
