"""GenerateRequest validation and the scheduler's configuration (no gRPC)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scheduler_svc.config import ProposerAddress, SchedulerConfig, config_from_args, parse_proposer
from specdec.model.sampling import SamplingParams
from scheduler_svc.validation import Limits, validate_request
from specdec.pb import generation_pb2

LIMITS = Limits(vocab_size=100, max_seq_len=32, max_tokens_limit=16, proposer_names=("ngram", "draft"))


def tokenize(text: str) -> list[int]:
    return [ord(c) % 100 for c in text]


def check(**fields):
    return validate_request(generation_pb2.GenerateRequest(**fields), LIMITS, tokenize)


def test_a_valid_request_becomes_plain_params():
    params = check(prompt="hi", max_tokens=5, temperature=0.5, top_p=0.9, top_k=3, seed=7, stop=["\n"],
                   proposer="draft", ignore_eos=True)
    assert params.prompt_token_ids == (4, 5)
    assert params.sampling == SamplingParams(0.5, pytest.approx(0.9), 3) and params.seed == 7
    assert (params.max_tokens, params.stop, params.proposer, params.ignore_eos) == (5, ("\n",), "draft", True)
    greedy = check(prompt_token_ids=[1, 2], max_tokens=1)
    assert greedy.sampling == SamplingParams() and greedy.seed is None and greedy.proposer == ""
    assert check(prompt_token_ids=[1] * 16, max_tokens=16).max_tokens == 16  # exactly the context


@pytest.mark.parametrize("fields, message", [
    (dict(max_tokens=5), "the prompt is empty"),
    (dict(prompt="a", prompt_token_ids=[1], max_tokens=5), "not both"),
    (dict(prompt_token_ids=[1] * 32, max_tokens=1), "at most 31"),
    (dict(prompt_token_ids=[1] * 20, max_tokens=13), "lower max_tokens to at most 12"),
    (dict(prompt_token_ids=[1], max_tokens=0), ">= 1"),
    (dict(prompt_token_ids=[1], max_tokens=17), "limit of 16"),
    (dict(prompt_token_ids=[1], max_tokens=5, temperature=-1), "temperature"),
    (dict(prompt_token_ids=[1], max_tokens=5, temperature=float("inf")), "temperature"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_p=float("nan")), "top_p"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_p=-0.1), "top_p"),
    (dict(prompt_token_ids=[1], max_tokens=5, top_k=-2), "top_k"),
    (dict(prompt_token_ids=[1], max_tokens=5, proposer="medusa"), "proposers are ngram, draft; use 'none'"),
    (dict(prompt_token_ids=[1, 100], max_tokens=5), "prompt_token_ids[1] = 100 is outside the vocabulary"),
    (dict(prompt_token_ids=[1], max_tokens=5, stop=["x", ""]), "stop strings"),
])
def test_bad_fields_are_named(fields, message):
    with pytest.raises(ValueError) as info:
        check(**fields)
    assert message in str(info.value)


def test_a_text_prompt_that_encodes_to_nothing():
    with pytest.raises(ValueError, match="encodes to no tokens"):
        validate_request(generation_pb2.GenerateRequest(prompt="x", max_tokens=1), LIMITS, lambda text: [])


def test_flags_fill_the_config(monkeypatch):
    monkeypatch.setenv("SPECDEC_MAX_WAITING", "9")
    config = config_from_args(["--verifier", "h:1", "--proposer", "ngram=h:2", "--proposer", "draft=h:3",
                               "--k", "5", "--policy", "none", "--port", "0"])
    assert config.proposers == (ProposerAddress("ngram", "h:2"), ProposerAddress("draft", "h:3"))
    assert (config.k, config.policy, config.max_waiting, config.port) == (5, "none", 9, 0)
    assert "  max_waiting = 9" in config.describe().splitlines()
    # The dataclass holds the only defaults: no flag and no variable give exactly them.
    assert config_from_args(["--verifier", "h:1"], env={}) == SchedulerConfig(verifier="h:1")
    assert config_from_args([], env={"SPECDEC_VERIFIER": "h:1", "SPECDEC_PROPOSER": "a=h:2,b=h:3"}).proposer_names \
        == ["a", "b"]


def test_the_config_imports_nothing_of_the_policies_or_the_engine():
    """The configuration and the policies share the contracts (NO_PROPOSER, the batch-size table) in types.py;
    the configuration imports nothing else of the scheduler."""
    code = "import sys, scheduler_svc.config; print(sorted(m for m in sys.modules if m.startswith('scheduler_svc.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2]).stdout
    assert loaded.strip() == "['scheduler_svc.config', 'scheduler_svc.types']"


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="NAME=HOST:PORT"):
        parse_proposer("ngram")
    with pytest.raises(ValueError, match="may not be named 'none'"):
        SchedulerConfig(verifier="h:1", proposers=(ProposerAddress("none", "h:2"),))
    with pytest.raises(ValueError, match="repeated: a"):
        SchedulerConfig(verifier="h:1", proposers=(ProposerAddress("a", "h:2"), ProposerAddress("a", "h:3")))
    with pytest.raises(SystemExit):
        config_from_args(["--proposer", "a=h:2"])  # no verifier
