"""The OpenAI-compatible HTTP API of a running stack (real processes on loopback), driven with the official
openai package, against the gRPC API of the same scheduler:

- greedy text over HTTP is the gRPC API's, token for token (completions and, on a checkpoint with a chat
  template, chat), streamed or not; usage and the speculation extension agree with the gRPC stats;
- n = 2 with a seed: completion i is the gRPC API's completion with seed + i, and a repeat gives the same;
- logprobs (+ top_logprobs) are the gRPC API's numbers; stop strings; errors 400 and 404;
- a client that closes its stream mid-way frees the request's slot in the verifier and its state in every
  proposer;
- a chat template: the templated prompt holds one BOS (no second one from the tokenizer), every EOS id of
  generation_config.json stops generation, and chat over gRPC and HTTP give the same tokens.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import openai
import pytest
import torch

from conftest import http_url
from specdec.ops.launcher import Stack, free_ports, local_specs
from specdec.pb import proposer_pb2, proposer_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from specdec_client import Client

pytestmark = pytest.mark.timeout(300)
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def stack(tiny_stack):
    return tiny_stack


@pytest.fixture(scope="module")
def api(stack) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{http_url(stack)}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(stack) -> Client:
    with Client(stack.spec("scheduler").address, timeout=60) as client:
        yield client


def held_state(stack: Stack) -> dict[str, list[str]]:
    """Request ids each internal service holds state for, from their Info."""
    held = {}
    for spec in stack.specs:
        if spec.name == "scheduler":
            continue
        with grpc.insecure_channel(spec.address) as channel:
            if spec.name == "verifier":
                info = verifier_pb2_grpc.VerifierStub(channel).Info(verifier_pb2.VerifierInfoRequest(), timeout=10)
            else:
                info = proposer_pb2_grpc.ProposerStub(channel).Info(proposer_pb2.ProposerInfoRequest(), timeout=10)
        held[spec.name] = list(info.active_request_ids)
    return held


def until_released(stack: Stack, timeout_s: float = 10.0) -> dict[str, list[str]]:
    end = time.monotonic() + timeout_s
    while True:
        held = held_state(stack)
        if not any(held.values()) or time.monotonic() > end:
            return held
        time.sleep(0.05)


def test_models_and_model_info(api, grpc_client):
    info = grpc_client.model_info()
    assert info.model == "target" and not info.has_chat_template and info.vocab_size == 4096
    assert info.eos_token_ids == [0] and set(info.proposers) == {"ngram", "draft", "medusa"}
    assert [m.id for m in api.models.list().data] == ["target"]
    assert api.models.retrieve("target").model_extra["max_model_len"] == info.context_length


@pytest.mark.parametrize("proposer", ["ngram", "draft", "medusa", "none"])
def test_greedy_text_over_http_is_the_grpc_apis_token_for_token(api, grpc_client, proposer):
    want = grpc_client.generate(PROMPT, max_tokens=40, proposer=proposer, ignore_eos=True, logprobs=True)
    extra = {"proposer": proposer, "ignore_eos": True}
    result = api.completions.create(model="target", prompt=PROMPT, max_tokens=40, temperature=0, logprobs=0,
                                    extra_body=extra)
    choice = result.choices[0]
    assert choice.text == want.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [lp.token for lp in want.logprobs]
    assert choice.logprobs.token_logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-5)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (want.stats.prompt_tokens, 40)
    speculation = result.model_extra["speculation"]
    assert speculation["accepted"] <= speculation["proposed"]
    if proposer != "none":
        assert speculation["proposed"] > 0 and set(speculation["proposers"]) == {proposer}
    # Streamed: the same text; usage last.
    stream = api.completions.create(model="target", prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                    stream_options={"include_usage": True}, extra_body=extra)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == 40
    # Token ids as the prompt give the same.
    ids = api.completions.create(model="target", prompt=prompt_ids(PROMPT), max_tokens=40, temperature=0,
                                 extra_body=extra)
    assert ids.choices[0].text == want.text


def prompt_ids(text: str) -> list[int]:
    """The text's token ids under the tiny target's (embedded) tokenizer."""
    from tokenizers import Tokenizer

    from specdec.model.checkpoint import EMBEDDED_MODELS

    return Tokenizer.from_file(str(EMBEDDED_MODELS / "tokenizer" / "tokenizer.json")).encode(text).ids


def test_n_completions_with_a_seed_are_the_grpc_apis_with_seed_plus_index(api, grpc_client):
    kwargs = dict(model="target", prompt=PROMPT, max_tokens=16, temperature=1.0, n=2, seed=7,
                  extra_body={"ignore_eos": True})
    result = api.completions.create(**kwargs)
    texts = [c.text for c in sorted(result.choices, key=lambda c: c.index)]
    assert [c.index for c in result.choices] == [0, 1] and result.usage.completion_tokens == 32
    for i, text in enumerate(texts):
        assert text == grpc_client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7 + i, ignore_eos=True).text
    assert texts[0] != texts[1]
    assert [c.text for c in api.completions.create(**kwargs).choices] == texts  # reproducible
    grpc_n = grpc_client.generate(PROMPT, max_tokens=16, temperature=1.0, seed=7, ignore_eos=True, n=2)
    assert [c.text for c in grpc_n.completions] == texts


def test_top_logprobs_stop_and_errors(api, grpc_client):
    want = grpc_client.generate(PROMPT, max_tokens=12, top_logprobs=3, ignore_eos=True)
    result = api.completions.create(model="target", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    top = result.choices[0].logprobs.top_logprobs
    assert len(top) == 12
    for position, lp in zip(top, want.logprobs):
        assert position == pytest.approx({t.token: t.logprob for t in lp.top_logprobs}, abs=1e-5)
        assert max(position.values()) >= lp.logprob - 1e-5  # the greedy token is the most likely one
    # A stop string cuts the text before it.
    text = grpc_client.generate(PROMPT, max_tokens=30, ignore_eos=True).text
    stop = text[10:13]
    cut = api.completions.create(model="target", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model="target", prompt=PROMPT, max_tokens=100_000)
    assert "above this server's limit" in info.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="target", messages=[{"role": "user", "content": "hi"}])
    assert "has no chat template" in info.value.body["message"]


@pytest.mark.parametrize("endpoint", ["completions", "completions-unary"])
def test_a_client_that_disconnects_frees_the_request_everywhere(stack, api, endpoint):
    assert not any(held_state(stack).values())
    if endpoint == "completions":
        stream = api.completions.create(model="target", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True, "proposer": "draft"})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        held = held_state(stack)
        assert held["verifier"] and held["proposer-draft"]  # running, mid-way
        stream.close()
    else:
        import httpx2

        with pytest.raises(httpx2.ReadTimeout):
            httpx2.post(f"{http_url(stack)}/v1/completions", timeout=0.5,
                        json={"model": "target", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                              "proposer": "draft"})
    assert until_released(stack) == {name: [] for name in held_state(stack)}


# -- a checkpoint with a chat template and several EOS ids ---------------------------------------------------

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A fibonacci function?"}]


def _templated(tokenizer_json: Path) -> list[int]:
    """The chat's prompt as it must reach the model: one BOS (id 0), then the rest of the templated text."""
    from tokenizers import Tokenizer

    text = ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\nA fibonacci function?<|im_end|>\n"
            "<|im_start|>assistant\n")
    return [0, *Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids]


@pytest.fixture(scope="module")
def chat_stack(tiny_models, tmp_path_factory):
    """Verifier, prompt lookup and scheduler (with HTTP) on a copy of the tiny target whose tokenizer adds a
    BOS, with a chat template, and whose generation_config.json lists an end-of-turn id besides the EOS: the
    greedy reply's 4th token. Yields (stack, prompt ids, the reply's first 3 tokens)."""
    from transformers import AutoModelForCausalLM

    target = tmp_path_factory.mktemp("chat") / "chat-target"
    shutil.copytree(tiny_models[0], target)
    tokenizer = json.loads((target / "tokenizer.json").read_text())
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}},
    }
    (target / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((target / "tokenizer_config.json").read_text())
    (target / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    prompt = _templated(target / "tokenizer.json")
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.inference_mode():
        # The attention mask is given: inferred from a pad id, it would hide the BOS (id 0 is every special token).
        ids = torch.tensor([prompt])
        reply = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    end_of_turn = reply[3]
    assert end_of_turn not in reply[:3] and 0 not in reply[:4], reply
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, end_of_turn]}))
    specs = local_specs(0, ("ngram",), policy="fixed", k=3, model=target, env={"SPECDEC_TORCH_THREADS": "1"},
                        http_port=free_ports(1)[0])
    with Stack(specs, log_dir=tmp_path_factory.mktemp("chat-logs"), startup_timeout_s=180, grace_s=5,
               echo=None) as stack:
        yield stack, prompt, reply[:3], end_of_turn


def test_chat_through_the_template_with_one_bos_and_several_eos_ids(chat_stack):
    stack, prompt, reply, end_of_turn = chat_stack
    with Client(stack.spec("scheduler").address, timeout=60) as client:
        info = client.model_info()
        assert info.has_chat_template and info.eos_token_ids == [0, end_of_turn]
        chat = client.chat(MESSAGES, max_tokens=8)
        # One BOS: the template writes it, the tokenizer does not add another.
        assert chat.stats.prompt_tokens == len(prompt)
        assert chat.token_ids == reply and chat.finish_reason == "eos"  # the end-of-turn id stopped it
        assert client.generate(prompt, max_tokens=8).token_ids == reply
        # A plain prompt still gets the tokenizer's BOS.
        assert client.generate("x", max_tokens=1).stats.prompt_tokens == 2
        streamed = client.chat_stream(MESSAGES, max_tokens=8)
        assert streamed.collect().token_ids == reply
    with openai.OpenAI(base_url=f"{http_url(stack)}/v1", api_key="unused", max_retries=0, timeout=60) as api:
        result = api.chat.completions.create(model="chat-target", messages=MESSAGES, max_tokens=8, temperature=0,
                                             logprobs=True)
        choice = result.choices[0]
        assert choice.message.content == chat.text and choice.finish_reason == "stop"
        assert len(choice.logprobs.content) == 3 and result.usage.prompt_tokens == len(prompt)
        stream = api.chat.completions.create(model="chat-target", messages=MESSAGES, max_tokens=8, temperature=0,
                                             stream=True)
        deltas = [c.choices[0] for c in stream if c.choices]
        assert deltas[0].delta.role == "assistant"
        assert "".join(d.delta.content or "" for d in deltas) == chat.text and deltas[-1].finish_reason == "stop"


def test_specdec_chat_one_message_and_a_conversation_on_stdin(chat_stack, capsys, monkeypatch):
    import asyncio
    import io

    from specdec.ops import cli
    from specdec_client import AsyncClient

    stack, prompt, reply, _ = chat_stack
    address = stack.spec("scheduler").address
    with Client(address, timeout=60) as client:
        want = client.chat(MESSAGES, max_tokens=8).text

    async def async_chat():
        async with AsyncClient(address, timeout=60) as client:
            info = await client.model_info()
            result = await client.chat(MESSAGES, max_tokens=8)
            streamed = await client.chat_stream(MESSAGES, max_tokens=8).collect()
            return info, result, streamed

    info, result, streamed = asyncio.run(async_chat())
    assert info.has_chat_template and result.text == streamed.text == want
    assert cli.main(["chat", MESSAGES[1]["content"], "--system", MESSAGES[0]["content"], "--target", address,
                     "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == want + "\n"
    # A conversation: each line a user turn, the history sent with every turn.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{MESSAGES[1]['content']}\n\nand again?\n"))
    assert cli.main(["chat", "--system", MESSAGES[0]["content"], "--target", address, "--max-tokens", "8"]) == 0
    with Client(address, timeout=60) as client:
        second = client.chat([*MESSAGES, {"role": "assistant", "content": want},
                              {"role": "user", "content": "and again?"}], max_tokens=8).text
    assert capsys.readouterr().out == f"{want}\n{second}\n"
    # An unreachable server: one line on stderr, exit 1.
    assert cli.main(["chat", "hi", "--target", "127.0.0.1:1", "--retries", "0", "--timeout", "2"]) == 1
    assert "is unavailable" in capsys.readouterr().err
