"""The demo's prompts: held-out chat prompts that exist (the demo itself runs the default model: `make demo`)."""

from specdec.ops import demo
from specdec.ops.chat_prompts import load_chat_prompts


def test_the_demo_prompts_are_held_out_chat_prompts():
    held_out = {prompt.id for prompt in load_chat_prompts()}
    assert demo.PROMPT_IDS and set(demo.PROMPT_IDS) <= held_out
    assert set(demo.PROPOSERS) == {"ngram", "draft", "medusa"}
