"""Self-distillation of a draft model for a chat target: training prompts, the target's replies with soft
labels, the draft's shape and loss, and the offline measure of what a draft buys (tokens per step).

scripts/train_chat_draft.py runs these as stages; tests/unit/test_distill.py checks them on the tiny test models.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import json
import math
import pkgutil
import random
import time
import warnings
from pathlib import Path

import torch

# Docstrings the held-out set quotes (bench/prompts/README.md): never trained on.
HELD_OUT_OBJECTS = frozenset({"functools.lru_cache", "shutil.copytree", "textwrap.dedent", "json.dumps"})
TOP_K = 16  # teacher log-probabilities kept per position
MAX_PROMPT_TOKENS = 384
MAX_REPLY_TOKENS = 128

# -- prompts -------------------------------------------------------------------------------------------

TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "black holes", "the French Revolution",
    "machine learning", "vaccines", "plate tectonics", "the stock market", "climate change", "the immune system",
    "recycling", "the Roman Empire", "electric cars", "sleep", "meditation", "the internet", "volcanoes",
    "honey bees", "the moon landing", "inflation", "democracy", "renewable energy", "the human heart",
    "coffee", "chess", "the printing press", "DNA", "rainbows", "gravity", "time zones", "email etiquette",
    "budgeting", "public speaking", "learning a new language", "houseplants", "composting", "marathon training",
    "job interviews", "writing a resume", "first aid", "cloud computing", "encryption", "version control",
    "databases", "operating systems", "unit testing", "recursion", "sorting algorithms", "hash tables",
    "the Pythagorean theorem", "prime numbers", "probability", "fractions", "percentages", "the metric system",
    "bread baking", "tea", "bicycles", "trains", "weather forecasts", "earthquakes", "oceans", "deserts",
    "forests", "birds", "dolphins", "elephants", "ants", "mushrooms", "the solar system", "stars", "light",
    "sound", "magnets", "batteries", "3D printing", "smartphones", "social media", "libraries", "museums",
    "the Olympic Games", "music theory", "painting", "photography", "poetry", "novels", "theatre", "cinema",
]
TOPIC_TEMPLATES = [
    "Explain {t} in simple terms.", "What are three interesting facts about {t}?",
    "Give me a short introduction to {t}.", "Why is {t} important?", "Write a short paragraph about {t}.",
    "What are common misconceptions about {t}?", "How would you explain {t} to a ten-year-old?",
    "Give three practical tips related to {t}.", "Write a haiku about {t}.", "Summarize the history of {t}.",
    "What questions should a beginner ask about {t}?", "Compare {t} and {u} briefly.",
]
CODE_TASKS = [
    "reverses a list", "checks whether a number is prime", "counts the vowels in a string",
    "returns the n-th Fibonacci number", "merges two sorted lists", "removes duplicates from a list keeping order",
    "computes the factorial of a number", "finds the largest element of a list", "converts Celsius to Fahrenheit",
    "checks whether a string is a palindrome", "flattens a nested list", "counts word frequencies in a text",
    "returns the greatest common divisor of two numbers", "reads a CSV file and prints each row",
    "sorts a list of dictionaries by a key", "computes the average of a list of numbers",
    "capitalizes the first letter of every word", "returns the sum of the digits of an integer",
    "finds all even numbers in a list", "checks whether two strings are anagrams", "implements binary search",
    "transposes a matrix given as a list of lists", "validates an email address with a regular expression",
    "generates a random password", "converts a list of strings to uppercase", "finds the second largest number",
    "rotates a list by k positions", "counts lines in a file", "returns the intersection of two lists",
    "implements a simple stack class", "implements a queue with two stacks", "parses a date string",
]
CODE_TEMPLATES = [
    "Write a Python function that {t}.", "Write a Python function that {t}. Add a docstring.",
    "Show me how to write a function that {t} in Python, and explain it.",
    "Write a JavaScript function that {t}.", "What is the time complexity of a function that {t}?",
]
DOC_TEMPLATES = [
    "Summarize the following documentation in two sentences:\n\n{doc}",
    "What does `{name}` do? Here is its documentation:\n\n{doc}",
    "Rewrite this text in simpler words:\n\n{doc}",
    "List the main points of this text as bullet points:\n\n{doc}",
    "Write a short example that uses `{name}` in Python.",
    "Explain this documentation to a beginner:\n\n{doc}",
    "Which arguments or options does this text mention?\n\n{doc}",
]
PASSAGE_TEMPLATES = [
    "Summarize the following text:\n\n{doc}", "What is this text about? Answer in one paragraph.\n\n{doc}",
    "Extract the key facts from this text:\n\n{doc}", "Rewrite the following text more concisely:\n\n{doc}",
]


def _math_prompt(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 90), rng.randint(2, 40), rng.randint(2, 12)
    return rng.choice([
        f"A train travels {a * c} km in {c} hours. What is its average speed?",
        f"If one notebook costs {b} dollars, how much do {c} notebooks cost?",
        f"What is {a} multiplied by {b}? Show your working.",
        f"Sarah has {a} apples and gives away {min(a - 1, b)}. How many are left?",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"What is {c * 10}% of {a * 10}?",
        f"Solve for x: {c}x + {b} = {c * a + b}.",
        f"A recipe needs {c} eggs for {b} people. How many eggs are needed for {b * 2} people?",
    ])


def stdlib_docs(min_chars: int = 120, max_chars: int = 1200) -> list[tuple[str, str]]:
    """(qualified name, docstring) of public stdlib modules, classes and functions, held-out ones left out.
    Imports every public stdlib module into this process: call it from a process of its own (a script)."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(m.name for m in pkgutil.iter_modules([str(stdlib)])
                   if not m.name.startswith("_") and m.name not in {"antigravity", "this", "idlelib", "tkinter",
                                                                    "turtle", "turtledemo", "test", "lib2to3"})
    docs: list[tuple[str, str]] = []
    for name in names:
        try:
            with warnings.catch_warnings():  # deprecated modules say so on import
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # modules that cannot be imported here (platform, missing C parts)
            continue
        objects = [(name, module)]
        for attr, value in vars(module).items():
            if not attr.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value)) \
                    and getattr(value, "__module__", None) == name:
                objects.append((f"{name}.{attr}", value))
        for qualname, obj in objects:
            doc = inspect.getdoc(obj) or ""
            if qualname in HELD_OUT_OBJECTS or not min_chars <= len(doc):
                continue
            docs.append((qualname, doc[:max_chars]))
    return docs


def reference_topics(max_chars: int = 1200) -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(name, text.strip()[:max_chars]) for name, text in sorted(topics.items()) if len(text) > 200]


def debian_readmes(max_chars: int = 1200) -> list[tuple[str, str]]:
    out = []
    for path in sorted(Path("/usr/share/doc").glob("*/README*")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8").strip()
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        if len(text) > 200:
            out.append((path.parent.name, text[:max_chars]))
    return out


def build_prompts(count: int, seed: int = 0) -> list[dict]:
    """`count` chat prompts ({"id", "source", "messages"}) mixed from every source, deterministic for a seed."""
    rng = random.Random(seed)
    docs, topics, readmes = stdlib_docs(), reference_topics(), debian_readmes()
    makers = [
        (0.30, lambda i: ("stdlib docstring", *_doc_prompt(rng, docs))),
        (0.08, lambda i: ("python reference", *_passage_prompt(rng, topics))),
        (0.07, lambda i: ("debian readme", *_passage_prompt(rng, readmes))),
        (0.25, lambda i: ("written", _topic_prompt(rng), "")),
        (0.08, lambda i: ("written", rng.choice(CODE_TEMPLATES).format(t=rng.choice(CODE_TASKS)), "")),
        (0.22, lambda i: ("written", _math_prompt(rng), "")),
    ]
    weights = [w for w, _ in makers]
    prompts: list[dict] = []
    seen: set[str] = set()
    for attempt in range(count * 20):  # greedy replies to a repeated prompt would teach nothing new
        if len(prompts) == count:
            break
        _, make = rng.choices(makers, weights)[0]
        source, text, origin = make(attempt)
        if text in seen:
            continue
        seen.add(text)
        i = len(prompts)
        messages = [{"role": "user", "content": text}]
        if rng.random() < 0.15:
            messages.insert(0, {"role": "system", "content": rng.choice([
                "You are a concise assistant.", "You are a helpful teacher.", "Answer briefly and clearly.",
                "You are a friendly assistant who explains things step by step."])})
        prompts.append({"id": f"train-{i:05d}", "source": f"{source} {origin}".strip(), "messages": messages})
    return prompts


def _doc_prompt(rng: random.Random, docs) -> tuple[str, str]:
    name, doc = rng.choice(docs)
    return rng.choice(DOC_TEMPLATES).format(name=name, doc=doc), name


def _passage_prompt(rng: random.Random, passages) -> tuple[str, str]:
    name, text = rng.choice(passages)
    return rng.choice(PASSAGE_TEMPLATES).format(doc=text), name


def _topic_prompt(rng: random.Random) -> str:
    t, u = rng.sample(TOPICS, 2)
    return rng.choice(TOPIC_TEMPLATES).format(t=t, u=u)


# -- replies and soft labels ----------------------------------------------------------------------------


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The templated prompt's token ids (the template writes the BOS-like <|im_start|> itself)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _topk(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(TOP_K, dim=-1)
    return ids.to(torch.int32), values.to(torch.float16)


@torch.inference_mode()
def teacher_records(runner, tokenizer, prompts: list[dict], eos_ids: set[int], batch: int,
                    prefill_chunk: int = 4) -> list[dict]:
    """Greedy replies of the target to `prompts`, `batch` at a time; per sequence the token ids (prompt + reply)
    and the target's top-k log-probabilities for the token after each of them."""
    from specdec.model.runner import SeqInput

    records = []
    for start in range(0, len(prompts), batch):
        group = prompts[start: start + batch]
        ids = [chat_ids(tokenizer, p["messages"])[:MAX_PROMPT_TOKENS] for p in group]
        slots = [runner.allocate() for _ in group]
        top_ids: list[list[torch.Tensor]] = [[] for _ in group]
        top_lp: list[list[torch.Tensor]] = [[] for _ in group]
        tokens = [list(x) for x in ids]
        try:
            for c in range(0, len(group), prefill_chunk):  # full logits of every prompt position
                part = range(c, min(c + prefill_chunk, len(group)))
                outs = runner.forward([SeqInput(slots[j], ids[j]) for j in part])
                for j, out in zip(part, outs):
                    i_, v_ = _topk(out.logits)
                    top_ids[j].append(i_)
                    top_lp[j].append(v_)
            active = [j for j in range(len(group))]
            for _ in range(MAX_REPLY_TOKENS):
                nxt = {j: int(top_ids[j][-1][-1, 0]) for j in active}  # greedy: the top-1 of the last row
                for j in active:
                    tokens[j].append(nxt[j])
                active = [j for j in active if nxt[j] not in eos_ids]
                if not active:
                    break
                outs = runner.forward([SeqInput(slots[j], [nxt[j]]) for j in active])
                for j, out in zip(active, outs):
                    i_, v_ = _topk(out.logits)
                    top_ids[j].append(i_)
                    top_lp[j].append(v_)
        finally:
            for s in slots:
                runner.release(s)
        for j, p in enumerate(group):
            ti, tl = torch.cat(top_ids[j]), torch.cat(top_lp[j])
            n = len(tokens[j])
            # Rows predict the token after each position; the last token (EOS or the cut) has none when the
            # reply was cut at EOS, so rows may be one fewer than tokens.
            records.append({"id": p["id"], "tokens": torch.tensor(tokens[j], dtype=torch.int32),
                            "prompt_len": len(ids[j]), "top_ids": ti[: n - 1], "top_logp": tl[: n - 1]})
    return records


# -- the draft ------------------------------------------------------------------------------------------

DRAFT_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)
PROMPT_WEIGHT = 0.25  # of a prompt position's loss against a reply position's (the draft proposes replies)


def draft_config(target_config: dict):
    from transformers import LlamaConfig

    keep = ("vocab_size", "rms_norm_eps", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "rope_parameters")
    return LlamaConfig(**{k: target_config[k] for k in keep if k in target_config}, **DRAFT_SHAPE,
                       hidden_act="silu", tie_word_embeddings=True, attention_bias=False, mlp_bias=False)


def init_draft(target: Path):
    """A draft whose tied embedding is the target's projected onto its top principal directions (a start that
    already knows which tokens are alike), the rest at transformers' initialisation."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    config = draft_config(json.loads((target / "config.json").read_text()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    embed = load_file(target / "model.safetensors")["model.embed_tokens.weight"].float()  # [V, 576]
    centred = embed - embed.mean(0)
    _, _, v = torch.linalg.svd(centred[torch.randperm(len(centred))[:8192]], full_matrices=False)
    dims = min(config.hidden_size, len(v))  # a target narrower than the draft fills only the first columns
    low = centred @ v[:dims].T  # [V, dims]
    with torch.no_grad():
        weight = model.model.embed_tokens.weight
        weight[:, :dims] = low / low.std() * weight.std()
    return model


def load_records(work: Path) -> list[dict]:
    records = []
    for path in sorted(work.glob("teacher-*.pt")):
        records += torch.load(path)
    return records


def batches(records: list[dict], tokens_per_batch: int, rng: random.Random) -> list[list[dict]]:
    """Sequences of similar length together (little padding), shuffled batch order."""
    ordered = sorted(records, key=lambda r: len(r["tokens"]))
    out, current = [], []
    for r in ordered:
        if current and (len(current) + 1) * len(r["tokens"]) > tokens_per_batch:
            out.append(current)
            current = []
        current.append(r)
    if current:
        out.append(current)
    rng.shuffle(out)
    return out


def batch_loss(model, group: list[dict]) -> tuple[torch.Tensor, dict]:
    """Soft cross-entropy of the draft against the teacher's top-k distribution (renormalised) at every
    position, prompt positions weighted PROMPT_WEIGHT; also the draft's top-1 agreement on reply positions."""
    length = max(len(r["tokens"]) for r in group) - 1
    b = len(group)
    ids = torch.full((b, length), 0, dtype=torch.long)
    mask = torch.zeros((b, length), dtype=torch.long)
    top_ids = torch.zeros((b, length, TOP_K), dtype=torch.long)
    top_p = torch.zeros((b, length, TOP_K))
    weight = torch.zeros((b, length))
    reply = torch.zeros((b, length), dtype=torch.bool)
    for i, r in enumerate(group):
        n = len(r["tokens"]) - 1
        ids[i, :n] = r["tokens"][:n].long()
        mask[i, :n] = 1
        top_ids[i, :n] = r["top_ids"].long()
        top_p[i, :n] = torch.softmax(r["top_logp"].float(), dim=-1)
        p = r["prompt_len"] - 1  # rows from here on predict reply tokens
        weight[i, :p] = PROMPT_WEIGHT
        weight[i, p:n] = 1.0
        reply[i, p:n] = True
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, L, V]
    # -sum_k p_k log q_k = logsumexp(logits) - sum_k p_k logits_k (the p_k sum to 1): no [B, L, V] log-softmax.
    soft = torch.logsumexp(logits, dim=-1) - (top_p * logits.gather(-1, top_ids)).sum(-1)  # [B, L]
    loss = (soft * weight).sum() / weight.sum()
    with torch.no_grad():
        agree = (logits.argmax(-1) == top_ids[..., 0]) & reply
        stats = {"reply_positions": int(reply.sum()), "agree": int(agree.sum())}
    return loss, stats


@torch.inference_mode()
def evaluate(model, records: list[dict], tokens_per_batch: int) -> tuple[float, float]:
    model.eval()
    total, weight, agree, positions = 0.0, 0, 0, 0
    for group in batches(records, tokens_per_batch, random.Random(0)):
        loss, stats = batch_loss(model, group)
        total += loss.item() * len(group)
        weight += len(group)
        agree += stats["agree"]
        positions += stats["reply_positions"]
    return total / weight, agree / max(1, positions)


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, min(200, steps // 20))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# -- report ---------------------------------------------------------------------------------------------


def tokens_per_step(draft_runner, prompt: list[int], reply: list[int], k: int) -> tuple[int, int]:
    """Greedy speculative decoding of `reply` (the target's own greedy reply) with chains of k draft tokens, as
    the engine runs it: (tokens the verify steps generated, steps). reply[0] comes from the prefill; each step
    the draft guesses up to k tokens after the pending one, the matching prefix is accepted, plus the target's
    bonus token."""
    from specdec.model.runner import SeqInput

    slot = draft_runner.allocate()
    try:
        with torch.inference_mode():
            logits = draft_runner.forward([SeqInput(slot, [*prompt, reply[0]], last_logits_only=True)])[0].logits
            j, steps = 1, 0
            while j < len(reply):
                committed = draft_runner.length(slot)
                guesses, last = [], logits
                for _ in range(min(k, len(reply) - j - 1)):  # leave the bonus token to the target
                    guesses.append(int(last[-1].argmax()))
                    last = draft_runner.forward([SeqInput(slot, [guesses[-1]], last_logits_only=True)])[0].logits
                accepted = 0
                while accepted < len(guesses) and guesses[accepted] == reply[j + accepted]:
                    accepted += 1
                new = reply[j: j + accepted + 1]
                draft_runner.truncate(slot, committed)
                logits = draft_runner.forward([SeqInput(slot, new, last_logits_only=True)])[0].logits
                j += len(new)
                steps += 1
        return len(reply) - 1, steps
    finally:
        draft_runner.release(slot)


def forward_ms(runner, context: int = 200, repeats: int = 30) -> float:
    """Median time of a one-token forward at batch 1 after `context` cached tokens."""
    from specdec.model.runner import SeqInput

    slot = runner.allocate()
    try:
        runner.forward([SeqInput(slot, [5] * context, last_logits_only=True)])
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            runner.forward([SeqInput(slot, [7], last_logits_only=True)])
            times.append(time.perf_counter() - t)
            runner.truncate(slot, context)
        return sorted(times)[len(times) // 2] * 1e3
    finally:
        runner.release(slot)


# -- tree heads -----------------------------------------------------------------------------------------

IGNORE = -100  # label of a (row, head) whose token lies past the reply


@torch.inference_mode()
def head_examples_from_records(runner, records: list[dict], num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs for Medusa heads from teacher records: X [M, d] the target's final-normed hidden state at
    each reply position t (from the last prompt token on: the state its lm_head predicts token t + 1 from),
    Y [M, H] the reply token at t + 2 + i for head i (IGNORE past the reply). The target's replies are its own
    greedy choices, so the labels are what the heads will be asked to guess."""
    from specdec.model.runner import SeqInput

    xs, ys = [], []
    for record in records:
        tokens = record["tokens"].tolist()
        first = record["prompt_len"] - 1
        slot = runner.allocate()
        try:
            hidden = runner.forward([SeqInput(slot, tokens[:-1])], return_hidden=True)[0].hidden.float()
        finally:
            runner.release(slot)
        n = len(tokens)
        rows = range(first, n - 2)  # row t: head 0's label is tokens[t + 2]
        labels = torch.full((len(rows), num_heads), IGNORE, dtype=torch.long)
        for r, t in enumerate(rows):
            for i in range(num_heads):
                if t + 2 + i < n:
                    labels[r, i] = tokens[t + 2 + i]
        xs.append(hidden[first: n - 2].cpu())
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def tree_tokens_per_step(heads, hidden: torch.Tensor, reply: list[int], budget: int,
                         top_k: int = 4) -> tuple[int, int]:
    """Greedy decoding of `reply` with Medusa trees of `budget` nodes, as the engine runs it: (tokens the verify
    steps generated, steps). reply[0] comes from the prefill; with j tokens committed (the last, reply[j - 1],
    pending) the tree built from hidden[j - 1] (the target's state that produced reply[j - 1]) guesses
    reply[j], reply[j + 1], ...; the longest matching root path is accepted, plus the target's bonus token.

    hidden [len(reply), d]."""
    from specdec.model.medusa import build_tree

    with torch.inference_mode():
        log_probs = torch.log_softmax(heads(hidden.to(next(heads.parameters()).dtype)).float(), dim=-1)
    j, steps = 1, 0
    while j < len(reply):
        tokens, parents = build_tree(log_probs[j - 1], budget, top_k)
        node, accepted = -1, 0
        while j + accepted < len(reply) - 1:  # leave the bonus token to the target
            want = reply[j + accepted]
            child = next((c for c, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == want), None)
            if child is None:
                break
            node, accepted = child, accepted + 1
        j += accepted + 1
        steps += 1
    return len(reply) - 1, steps
