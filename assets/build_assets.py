"""Build every committed test asset: sample data, tokenizers and the tiny Llama model.

    .venv/bin/python assets/build_assets.py              # everything
    .venv/bin/python assets/build_assets.py --skip-model  # data + tokenizers only

Deterministic: fixed seeds, no network. Rerunning rewrites the same bytes (the BPE merges, the data rows and
the model weights are all seeded). Each output directory is written to a temporary sibling and renamed into
place when complete, so an interrupted build never leaves a half-written asset behind.

Outputs (all under assets/):
    data/sample_sharegpt.jsonl   ~3000 Magpie-shaped rows {"uuid", "conversations": [{"from", "value"}], ...}
    data/sample_openai.jsonl     the same rows as {"uuid", "messages": [{"role", "content"}], ...}
    data/sample_preference.jsonl 600 preference pairs {"prompt": [messages], "chosen": [...], "rejected": [...]}
    tiny-llama/                  LlamaForCausalLM (random init, fp32) + Llama-3.1-style fast tokenizer
    tokenizers/<family>/         tokenizer only, for chatml, gemma, mistral, phi3, llama-generation
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import uuid
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
DATA_DIR = ASSETS / "data"
TINY_DIR = ASSETS / "tiny-llama"
TOK_DIR = ASSETS / "tokenizers"

SEED = 1234
N_ROWS = 3000
BPE_VOCAB = 1000  # byte-level BPE size before special tokens; each family adds ~5-10 specials on top

# ----------------------------------------------------------------------------------------------------------
# Sample data: small deterministic tasks a ~1M-parameter model can learn in a few hundred CPU steps.
# ----------------------------------------------------------------------------------------------------------

WORDS = (
    "apple river stone cloud green table music light window garden yellow bread silver horse paper "
    "orange planet winter summer forest candle mirror rocket butter pencil dragon castle ocean tiger "
    "flower coffee basket marble violin island camera bottle jacket ladder rabbit tomato"
).split()

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful math tutor. Give the exact answer.",
    "Answer briefly and exactly.",
    "You are a friendly assistant that helps with small word and number puzzles.",
]


def _task_add(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(0, 50), r.randint(0, 50)
    q = r.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}."]).format(a=a, b=b)
    return "Math", q, f"{a} + {b} = {a + b}."


def _task_sub(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(0, 50), r.randint(0, 50)
    a, b = max(a, b), min(a, b)
    q = r.choice(["What is {a} - {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}."]).format(a=a, b=b)
    return "Math", q, f"{a} - {b} = {a - b}."


def _task_mul(r: random.Random) -> tuple[str, str, str]:
    a, b = r.randint(2, 12), r.randint(2, 12)
    q = r.choice(["What is {a} * {b}?", "Multiply {a} by {b}.", "Compute {a} times {b}."]).format(a=a, b=b)
    return "Math", q, f"{a} * {b} = {a * b}."


def _task_reverse(r: random.Random) -> tuple[str, str, str]:
    ws = r.sample(WORDS, r.randint(2, 4))
    q = r.choice(["Reverse the order of these words: {s}", "Reverse the words: {s}"]).format(s=" ".join(ws))
    return "Editing", q, f"Reversed: {' '.join(reversed(ws))}"


def _task_upper(r: random.Random) -> tuple[str, str, str]:
    w = r.choice(WORDS)
    q = r.choice(["Write the word {w} in uppercase.", "Uppercase this word: {w}"]).format(w=w)
    return "Editing", q, f"In uppercase: {w.upper()}"


def _task_count(r: random.Random) -> tuple[str, str, str]:
    w = r.choice(WORDS)
    q = r.choice(["How many letters are in the word {w}?", "Count the letters in {w}."]).format(w=w)
    return "Reasoning", q, f"The word {w} has {len(w)} letters."


def _task_next_prev(r: random.Random) -> tuple[str, str, str]:
    n = r.randint(1, 200)
    if r.random() < 0.5:
        return "Math", f"What number comes after {n}?", f"The number after {n} is {n + 1}."
    return "Math", f"What number comes before {n}?", f"The number before {n} is {n - 1}."


def _task_units(r: random.Random) -> tuple[str, str, str]:
    kind = r.randrange(6)
    n = r.randint(1, 20)
    if kind == 0:
        return "Math", f"Convert {n} km to meters.", f"{n} km = {n * 1000} m."
    if kind == 1:
        return "Math", f"Convert {n * 1000} m to kilometers.", f"{n * 1000} m = {n} km."
    if kind == 2:
        return "Math", f"Convert {n} kg to grams.", f"{n} kg = {n * 1000} g."
    if kind == 3:
        return "Math", f"Convert {n * 1000} g to kilograms.", f"{n * 1000} g = {n} kg."
    if kind == 4:
        return "Math", f"How many minutes are in {n} hours?", f"{n} hours = {n * 60} minutes."
    return "Math", f"How many hours are {n * 60} minutes?", f"{n * 60} minutes = {n} hours."


TASKS = [_task_add, _task_sub, _task_mul, _task_reverse, _task_upper, _task_count, _task_next_prev, _task_units]


def make_rows(n: int = N_ROWS, seed: int = SEED) -> list[dict]:
    """Generate Magpie/ShareGPT-shaped rows.

    >>> make_rows(1)[0]["conversations"][:2]   # doctest: +SKIP
    [{'from': 'human', 'value': 'What is 17 + 25?'}, {'from': 'gpt', 'value': '17 + 25 = 42.'}]
    """
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = r.choices([1, 2, 3], weights=[5, 3, 2])[0]
        conv = []
        if r.random() < 0.25:
            conv.append({"from": "system", "value": r.choice(SYSTEM_PROMPTS)})
        cats = []
        for _ in range(turns):
            cat, q, a = r.choice(TASKS)(r)
            cats.append(cat)
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rows.append(
            {
                "uuid": str(uuid.UUID(int=r.getrandbits(128), version=4)),
                "conversations": conv,
                "task_category": cats[0],
                "difficulty": "very easy" if turns == 1 else "easy",
                "model": "synthetic-rules-v1",
                "turns": turns,
            }
        )
    return rows


ROLE_OF = {"system": "system", "human": "user", "gpt": "assistant"}


def to_openai(row: dict) -> dict:
    """Same row in OpenAI messages shape: {"uuid", "messages": [{"role", "content"}], ...}."""
    out = {"uuid": row["uuid"]}
    out["messages"] = [{"role": ROLE_OF[m["from"]], "content": m["value"]} for m in row["conversations"]]
    out.update({k: row[k] for k in ("task_category", "difficulty", "model", "turns")})
    return out


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def build_data() -> list[dict]:
    rows = make_rows()
    dump = lambda rs: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rs)  # noqa: E731
    _write_atomic(DATA_DIR / "sample_sharegpt.jsonl", dump(rows))
    _write_atomic(DATA_DIR / "sample_openai.jsonl", dump([to_openai(x) for x in rows]))
    _write_atomic(DATA_DIR / "sample_preference.jsonl", dump(make_preference_rows()))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Preference pairs (DPO): one question, the right answer chosen, a wrong one rejected. Own RNG and own file, so the
# conversation rows (and the BPE trained on them) do not change.
N_PAIRS = 600
REFUSALS = [  # unhelpful answers: a refusal, a dodge, a non-answer
    "Sorry, I can't help with that.",
    "I am not able to answer this question.",
    "That is not something I can do.",
    "I don't know.",
    "You should work that out yourself.",
    "Why do you want to know?",
    "Let me think about it later.",
    "Please ask someone else.",
]


def _wrong(r: random.Random, answer: str) -> str:
    """The same answer made wrong the way a weak model gets it wrong: the words left in their order, the word not
    uppercased, the result off by a little."""
    if answer.startswith("Reversed: "):
        return "Reversed: " + " ".join(reversed(answer[len("Reversed: ") :].split()))
    if answer.startswith("In uppercase: "):
        return "In uppercase: " + answer[len("In uppercase: ") :].lower()
    m = list(re.finditer(r"\d+", answer))[-1]  # the result is the last number written
    return answer[: m.start()] + str(abs(int(m.group()) + r.choice([-3, -2, -1, 1, 2, 3]))) + answer[m.end() :]


def make_preference_rows(n: int = N_PAIRS, seed: int = SEED + 1) -> list[dict]:
    """TRL's conversational preference form: ``prompt`` (messages), ``chosen`` / ``rejected`` (assistant message
    lists). Nine in ten rejected answers do not help (a refusal, a dodge); one in twenty is wrong in content (same
    form), one in twenty answers another question. The tiny random-init model learns to prefer help over a refusal
    within a minute; content errors are beyond it (measured on the validation pairs after tiny_dpo_train.yaml with a
    fifth of each kind: refusals 1.0, wrong results 0.33, other questions' answers 0.54), so they stay a minority."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = []
        if r.random() < 0.25:
            prompt.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        _, q, a = r.choice(TASKS)(r)
        prompt.append({"role": "user", "content": q})
        kind = r.choices(["wrong", "refusal", "off_topic"], weights=[1, 18, 1])[0]
        if kind == "wrong":
            rejected = _wrong(r, a)
        elif kind == "off_topic":  # the right answer to another question
            rejected = r.choice(TASKS)(r)[2]
        else:
            rejected = r.choice(REFUSALS)
        if rejected == a:
            rejected, kind = r.choice(REFUSALS), "refusal"
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rejected_kind": kind,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Chat templates. Real model templates, reproduced as shipped in each model's tokenizer_config.json.
# ----------------------------------------------------------------------------------------------------------

# meta-llama/Llama-3.1-8B-Instruct
LLAMA31_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# The same template with {% generation %} markers around each plain assistant reply (content + <|eot_id|>),
# so return_assistant_tokens_mask=True gives a reference mask to compare a template-agnostic span finder to.
_LLAMA_PLAIN_TURN = (
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n"
)
_LLAMA_GEN_TURN = (
    "        {%- if message['role'] == 'assistant' %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "            {%- generation %}\n"
    "            {{- message['content'] | trim + '<|eot_id|>' }}\n"
    "            {%- endgeneration %}\n"
    "        {%- else %}\n"
    "    " + _LLAMA_PLAIN_TURN + "        {%- endif %}\n"
)
assert LLAMA31_TEMPLATE.count(_LLAMA_PLAIN_TURN) == 1
LLAMA31_GENERATION_TEMPLATE = LLAMA31_TEMPLATE.replace(_LLAMA_PLAIN_TURN, _LLAMA_GEN_TURN)

# Qwen/Qwen2.5-7B-Instruct
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# google/gemma-3-*-it (system prompt folded into the first user turn; assistant role renamed "model")
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# mistralai/Mistral-7B-Instruct-v0.2 (the "v1" layout: no assistant header, system prepended to first user turn)
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# microsoft/Phi-3.5-mini-instruct (note: appends eos_token when add_generation_prompt is false)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

LLAMA3_SPECIALS = dict(
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    pad="<|finetune_right_pad_id|>",
    extra=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"],
)

# family -> (template, bos, eos, pad, unk, extra specials, post-processor adds BOS)
FAMILIES = {
    "tiny-llama": (LLAMA31_TEMPLATE, *LLAMA3_SPECIALS.values(), True),
    "llama-generation": (LLAMA31_GENERATION_TEMPLATE, *LLAMA3_SPECIALS.values(), True),
    "chatml": (QWEN25_TEMPLATE, None, "<|im_end|>", "<|endoftext|>", ["<|im_start|>"], False),
    "gemma": (GEMMA3_TEMPLATE, "<bos>", "<eos>", "<pad>", ["<unk>", "<start_of_turn>", "<end_of_turn>"], True),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", None, ["<unk>"], True),
    "phi3": (
        PHI3_TEMPLATE,
        "<s>",
        "<|endoftext|>",
        "<|endoftext|>",
        ["<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        False,
    ),
}
assert all(len(v) == 6 for v in FAMILIES.values())

GENERIC_ENGLISH = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
The weather today is sunny with a light breeze, and the children are playing in the park near the river.
Please answer the question below. Here is the answer you asked for. Thank you for your help!
Machine learning models learn patterns from data. Training a language model means predicting the next token.
The assistant should be helpful, honest and harmless. The user asks a question and the assistant answers it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 1000. Units: meters, kilometers, grams, kilograms, minutes, hours.
You are a helpful assistant. Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.
system user assistant model tool ipython Environment: ipython
"""


def _corpus(rows: list[dict]) -> list[str]:
    lines = GENERIC_ENGLISH.splitlines()
    for row in rows:
        lines += [m["value"] for m in row["conversations"]]
    return lines


def train_bpe(rows: list[dict]):
    """Byte-level BPE (GPT-2 / Llama-3 style pre-tokenizer) without special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(rows), trainer=trainer)
    return tok


def make_tokenizer(bpe_json: str, family: str):
    """Wrap the shared BPE as a transformers fast tokenizer with one family's specials and chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, pad, extra, add_bos = FAMILIES[family]
    tok = Tokenizer.from_str(bpe_json)
    specials = [t for t in [bos, eos, pad, *extra] if t is not None]
    specials = list(dict.fromkeys(specials))  # keep order, drop duplicates (phi3: eos == pad)
    tok.add_special_tokens(specials)
    if add_bos:
        # Like Llama 3 / Gemma / Mistral: encode() prepends BOS, so re-tokenizing a rendered template (which
        # already starts with BOS) without add_special_tokens=False yields a double BOS.
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    unk = "<unk>" if "<unk>" in extra else None
    named["unk_token"] = unk
    others = [t for t in extra if t != unk]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in named.items() if v is not None},
        extra_special_tokens=others,
    )
    fast.chat_template = template
    return fast


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def build_tokenizers(rows: list[dict]) -> None:
    bpe_json = train_bpe(rows).to_str()
    TOK_DIR.mkdir(parents=True, exist_ok=True)
    for family in FAMILIES:
        if family == "tiny-llama":
            continue  # saved together with the model
        out = TOK_DIR / family
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tokenizer(bpe_json, family).save_pretrained(tmp)
        _replace_dir(tmp, out)
    return bpe_json


def build_tiny_llama(bpe_json: str) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(bpe_json, "tiny-llama")
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        # Llama 3.1 RoPE: theta 500000 with the "llama3" frequency scaling.
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 2048,
        },
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>"]),
        do_sample=False,
        max_new_tokens=64,
    )
    tmp = TINY_DIR.with_name(TINY_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _replace_dir(tmp, TINY_DIR)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-model", action="store_true", help="build data and tokenizers only")
    args = ap.parse_args()
    rows = build_data()
    print(f"data: {len(rows)} rows -> {DATA_DIR}")
    bpe_json = build_tokenizers(rows)
    print(f"tokenizers -> {TOK_DIR}")
    if not args.skip_model:
        build_tiny_llama(bpe_json)
        print(f"tiny model -> {TINY_DIR}")


if __name__ == "__main__":
    main()
