"""One prompt function: how a causal-LM row becomes text, in training and in every answer after it.

Training, evaluation, sample generations and `launcher generate` / `eval` / `predict` all call
`render` (training text and the spans to learn) or `prompt_text` / `prompt_ids` (what the
model sees before it answers), reading a `PromptFormat`: the run's choice of template, system
prompt and column mapping, recorded in the export's launcher.json. A row's training text is its
generation prompt plus the response and the end-of-turn marker, and both are tokenized in
pieces cut where answers start (tokenize_at), so a model is asked at inference exactly the
tokens it was taught with.

Rows come in the shapes people have, each normalised to one of two forms:
- `{"instruction", "input"?, "output"}` (Alpaca), or TRL's `{"prompt": str, "completion": str}`
  (the prompt is the user's turn), or any columns mapped by `data.prompt` / `data.response`
  (`{column}` placeholders, e.g. prompt "Classify: {text}", response "{category}");
- `{"messages": [{"role", "content"}]}` (OpenAI / TRL conversational), TRL's conversational
  prompt/completion (two lists of messages), or ShareGPT `{"conversations": [{"from", "value"}]}`.

How each form renders:
- the tokenizer has a chat template: every row is a conversation (an instruction row is a user
  turn, its input appended after a blank line), rendered by that template; `data.system_prompt`
  becomes the first turn of rows that have none (null: none is added, and the template's own
  default, if it has one, applies in training and at inference alike);
- no chat template (tiny models, base models): instruction rows use `data.prompt_template`
  (Alpaca), conversations `data.chat_turn_template`; the system prompt, when set, goes first.
"""

from __future__ import annotations

import functools
import json
import re
import string
from dataclasses import asdict, dataclass

from launcher.data.tokenizer import settings_kept
from launcher.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "system": "system"}
SHAPES = ("instruction/output, messages, prompt/completion or conversations (ShareGPT)")
DEFAULT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
DEFAULT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_CHAT_TURN = "<|{role}|>\n{content}\n"


@dataclass(frozen=True)
class PromptFormat:
    """Everything that decides how a row becomes text (launcher.json's "prompt")."""

    chat_template: bool = False  # the tokenizer's own chat template renders every row
    style: str = "instruction"  # no chat template: bare prompts render as instruction | chat
    system_prompt: str | None = None
    prompt: str | None = None  # data.prompt: the user's turn built from a row's columns
    response: str | None = None  # data.response: the answer built from a row's columns
    prompt_template: str = DEFAULT_TEMPLATE
    prompt_template_no_input: str = DEFAULT_TEMPLATE_NO_INPUT
    chat_turn_template: str = DEFAULT_CHAT_TURN
    # Answers' spans start before the spaces that end their prompt (render). An export written
    # before this rule lacks the key: its model was trained with those spaces in the prompt.
    answer_over_spaces: bool = True
    # Rows and prompts are tokenized in pieces cut where answers start (tokenize_at). An export
    # written before lacks the key: its model was trained on whole texts, and is asked so.
    answer_pieces: bool = True

    @classmethod
    def from_config(cls, data_cfg, tokenizer, **changes) -> "PromptFormat":
        return cls(chat_template=bool(getattr(tokenizer, "chat_template", None)), system_prompt=data_cfg.system_prompt,
                   prompt=data_cfg.prompt, response=data_cfg.response, prompt_template=data_cfg.prompt_template,
                   prompt_template_no_input=data_cfg.prompt_template_no_input,
                   chat_turn_template=data_cfg.chat_turn_template).replace(**changes)

    def replace(self, **changes) -> "PromptFormat":
        import dataclasses

        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, meta: dict) -> "PromptFormat":
        """From launcher.json: its "prompt" object, or the flat keys exports had before it."""
        fields = {f for f in cls.__dataclass_fields__}
        if isinstance(meta.get("prompt"), dict):
            return cls(**{"answer_over_spaces": False, "answer_pieces": False} | {k: v for k, v in meta["prompt"].items() if k in fields})
        old = {k: meta[k] for k in ("prompt_template", "prompt_template_no_input", "chat_turn_template") if k in meta}
        return cls(style=meta.get("prompt_format", "instruction"), answer_over_spaces=False, answer_pieces=False, **old)


# ---------------------------------------------------------------- column mapping


def placeholders(template: str) -> list[str]:
    """The column names a data.prompt / data.response template uses."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def fixed_template_problems(key: str, template: str, fields: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[str]:
    """A prompt or turn template with fixed placeholders (data.prompt_template: {instruction}
    and {input}): each of `fields` present, none but those and `optional` (a literal brace, as
    in a JSON example, is {{ or }}). Caught here, a stray brace was a KeyError traceback at the
    first row."""
    braces = "write a literal brace as {{ or }}"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        return [f"{key}: not a valid template ({e}); {braces}"]
    missing = [f for f in fields if f not in names]
    if missing:
        return [f"{key}: must contain {' and '.join(f'{{{f}}}' for f in missing)}"]
    other = [n for n in names if n not in fields + optional]
    takes = ", ".join(f"{{{f}}}" for f in fields + optional)
    return [f"{key}: {{{other[0]}}} is not a placeholder here (it takes {takes}); {braces}"] if other else []


def template_problems(key: str, template: str | None) -> list[str]:
    """A data.prompt / data.response that cannot work whatever the data: one line each."""
    if template is None:
        return []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        return [f"{key}: {template!r} is not a valid template ({e}); write columns as {{name}} and a literal brace as {{{{"]
    names = [name for _, name, _, _ in parsed if name is not None]
    if not names:
        return [f"{key}: {template!r} names no column; use {{column}} placeholders, e.g. {{text}}"]
    bad = [n for n in names if n == "" or n.isdigit() or any(c in n for c in ".[]")]
    if bad:
        return [f"{key}: placeholder {{{bad[0]}}} is not a column name; use {{column}} placeholders, e.g. {{text}}"]
    specs = [spec or conv for _, name, spec, conv in parsed if name is not None and (spec or conv)]
    if specs:
        return [f"{key}: placeholders take no format spec or conversion ({specs[0]!r}); use plain {{column}}"]
    return []


def _fill(template: str, record: dict, key: str, where: str) -> str:
    values = {}
    for name in placeholders(template):
        value = record.get(name)
        if value is None:
            raise DataError(f"{where}: no '{name}' value for {key} ({template!r})")
        values[name] = value if isinstance(value, str) else str(value)
    return template.format_map(values)


def column_problems(columns: list[str], fmt: PromptFormat, source: str, mappable: bool = True) -> list[str]:
    """Checks on a whole file before any row is rendered: every placeholder names one of its
    columns, and without a mapping some column of a known shape exists. One line each.
    mappable False (eval and predict of an export, whose format is fixed): no mapping offered."""
    have = set(columns)
    listed = ", ".join(columns) or "none"
    if fmt.prompt is not None:
        out = []
        for key, template in (("data.prompt", fmt.prompt), ("data.response", fmt.response)):
            missing = [n for n in placeholders(template or "") if n not in have]
            if missing:
                out.append(f"{key}: {{{missing[0]}}} is not a column of {source} (its columns: {listed})")
        return out
    if not have & {"instruction", "messages", "prompt", "conversations"}:
        if not mappable:
            return [f"{source}: no {SHAPES} columns (its columns: {listed}), which this causal LM answers"]
        hint = ", ".join(f"{{{c}}}" for c in columns[:2]) or "{column}"
        return [f"{source}: no {SHAPES} columns (its columns: {listed}); map yours with "
                f"data.prompt='...{hint.split(', ')[0]}...' data.response='{hint.split(', ')[-1]}'"]
    return []


# ---------------------------------------------------------------- rows


def normalize(record, fmt: PromptFormat, where: str, need_answer: bool = True) -> dict:
    """A checked row: {"instruction", "input", "output"} or {"messages"}. DataError names file:line.
    need_answer False (predict, generate): the answer may be missing (output None; messages
    that end before the assistant's turn)."""
    if isinstance(record, DataError):
        raise record
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with {SHAPES}")
    if fmt.prompt is not None:
        output = _fill(fmt.response, record, "data.response", where) if need_answer and fmt.response else None
        return {"instruction": _fill(fmt.prompt, record, "data.prompt", where), "input": "", "output": output}
    if "messages" in record:
        return {"messages": _messages(_json_cell(record["messages"], where, "messages"), where, "messages", need_answer)}
    if "conversations" in record:
        turns = _json_cell(record["conversations"], where, "conversations")
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
        out = []
        for i, t in enumerate(turns):
            role = SHAREGPT_ROLES.get(str(t.get("from", t.get("role"))).strip().lower()) if isinstance(t, dict) else None
            content = t.get("value", t.get("content")) if isinstance(t, dict) else None
            if role is None or not isinstance(content, str):
                raise DataError(f"{where}: conversations[{i}] needs from (human, gpt or system) and a string value")
            out.append({"role": role, "content": content})
        return {"messages": _messages(out, where, "conversations", need_answer)}
    if "prompt" in record:
        prompt, completion = record["prompt"], record.get("completion")
        if isinstance(prompt, list):  # TRL's conversational prompt-completion
            completion = completion if completion is not None else []
            if not isinstance(completion, list):
                raise DataError(f"{where}: a 'prompt' list of messages needs a 'completion' list of messages")
            return {"messages": _messages(prompt + completion, where, "prompt/completion", need_answer)}
        if not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
        if completion is None and need_answer:
            raise DataError(f"{where}: missing string 'completion' beside 'prompt'")
        if completion is not None and not isinstance(completion, str):
            raise DataError(f"{where}: 'completion' must be a string")
        return {"instruction": prompt, "input": "", "output": completion}
    if "instruction" in record and not isinstance(record["instruction"], str):  # (it said no instruction at all)
        raise DataError(f"{where}: 'instruction' must be a string; got {type(record['instruction']).__name__}")
    if not isinstance(record.get("instruction"), str):
        raise DataError(f"{where}: no {SHAPES} (its keys: {', '.join(map(str, record)) or 'none'}); "
                        "map columns with data.prompt / data.response")
    # Dolly's rows (databricks-dolly-15k) name them context and response: read as input and
    # output where those are absent or null (a file of both shapes has every column in each row).
    out_key = "response" if record.get("output") is None and record.get("response") is not None else "output"
    given = {k: record.get(k) not in (None, "") for k in ("input", "context")}  # (0 or [] is given, and refused below)
    in_key = "context" if given["context"] and not given["input"] else "input"
    if given["input"] and given["context"]:
        raise DataError(f"{where}: both 'input' and 'context' (Dolly's input): give one")
    output = record.get(out_key)
    if need_answer and not isinstance(output, str):
        raise DataError(f"{where}: missing string 'output' (or give 'messages')" if out_key == "output" else
                        f"{where}: 'response' must be a string")
    extra = record.get(in_key)
    extra = "" if extra is None else extra  # (0 or [] is not an empty input)
    if not isinstance(extra, str):
        raise DataError(f"{where}: '{in_key}' must be a string")
    return {"instruction": record["instruction"], "input": extra, "output": output if isinstance(output, str) else None}


def _json_cell(value, where: str, key: str):
    """A conversation written into a CSV cell is its JSON text: the list it holds."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: '{key}' is not a JSON list ({e.msg})") from None
    return value


def _messages(messages, where: str, key: str, need_answer: bool) -> list[dict]:
    """Checked {role, content} turns. OpenAI's chat fine-tuning rows are read as that API writes
    them: `developer` is its newer name for the system turn, content may be a list of text
    parts (joined), and an assistant turn's `weight: 0` keeps it as context, untrained (it was
    dropped, and the turns a user had excluded were learned); a `weight` is 0 or 1."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        role = role.strip().lower() if isinstance(role, str) else role  # "User", as ShareGPT's `from` is read
        role = "system" if role == "developer" else role
        if role not in ROLES:
            said = f"; got {role!r}" if isinstance(role, str) else ""
            raise DataError(f"{where}: {key}[{i}] needs role (system, user or assistant) and string content{said}")
        turn = {"role": role, "content": _content(m.get("content"), f"{where}: {key}[{i}]")}
        if "weight" in m and m["weight"] is not None:
            weight = m["weight"]
            if weight not in (0, 1) or isinstance(weight, str):
                raise DataError(f"{where}: {key}[{i}] has weight {weight!r}: a turn's weight is 0 or 1")
            if weight == 0 and role == "assistant" and need_answer:  # (others never train; predict answers all)
                turn["weight"] = 0
        out.append(turn)
    if need_answer and not any(m["role"] == "assistant" and m.get("weight", 1) for m in out):
        zero = " (each has weight 0)" if any(m["role"] == "assistant" for m in out) else ""
        raise DataError(f"{where}: '{key}' has no assistant turn to learn from{zero}")
    return out


def _content(content, where: str) -> str:
    """A turn's text: a string, or a list of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = [p.get("type") for p in content]
        if all(k == "text" and isinstance(p.get("text"), str) for k, p in zip(kinds, content)):
            return "".join(p["text"] for p in content)
        other = next(k for k, p in zip(kinds, content) if k != "text" or not isinstance(p.get("text"), str))
        raise DataError(f"{where} has a content part of type {other!r}: only text parts are read")
    said = "null (a tool call?)" if content is None else type(content).__name__
    raise DataError(f"{where} needs role (system, user or assistant) and string content; got {said}")


def control_pattern(tokenizer) -> re.Pattern | None:
    """The tokenizer's special tokens as text (<|im_end|>, </s>), as one pattern (one search per
    text: Llama-3 has 256 of them): text of these inside a row is read as the token itself."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found = {t.content for t in decoder.values() if t.special} | set(getattr(tokenizer, "all_special_tokens", ()) or ())
    tokens = sorted((t for t in found if t), key=lambda t: (-len(t), t))  # (the longest first: "</s>" inside "</s>x")
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def own_words(record: dict, row: dict, fmt: PromptFormat) -> list[str]:
    """What a row itself says: its turns' contents, its instruction, input and output, or under
    data.prompt / data.response the column values they fill (the templates' own text, special
    tokens included, is written on purpose)."""
    if fmt.prompt is not None:
        names = placeholders(fmt.prompt) + (placeholders(fmt.response) if fmt.response else [])
        return [str(record[n]) for n in dict.fromkeys(names) if record.get(n) is not None]
    if "messages" in row:
        return [m["content"] for m in row["messages"]]
    return [row[k] for k in ("instruction", "input", "output") if isinstance(row.get(k), str)]


def control_text(texts: list[str], pattern: re.Pattern | None) -> str | None:
    """The first special token whose text `texts` hold (an answer quoting "<|im_end|>"), or None.
    Tokenized as that token, as a chat template's rendering is, it is not the text it reads as."""
    if pattern is None:
        return None
    return next((found.group(0) for text in texts if (found := pattern.search(text))), None)


def answer(row: dict) -> str | None:
    """The row's reference answer: the output, or the last assistant turn (None when absent)."""
    if "messages" not in row:
        return row["output"]
    last = _last_assistant(row["messages"])
    return row["messages"][last]["content"] if last is not None else None


def through_answer(row: dict, turn: int) -> dict:
    """The row as far as its answer number `turn` (0-based): what a conversation cut by
    max_length before its last answer still asks and answers (its reference and question)."""
    if "messages" not in row:
        return row
    ends = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"]
    return {**row, "messages": row["messages"][: ends[turn] + 1]} if turn < len(ends) - 1 else row


def untrained_turns(row: dict, spans: list) -> int:
    """The row's answers that render() found no span for because the chat template renders them
    otherwise once later turns follow (see its chat-template path); not those of weight 0, nor
    an opening assistant turn (after system turns alone: it answers nothing, and is context)."""
    if "messages" not in row:
        return 0
    messages = row["messages"]
    weighted = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    opening = sum(all(m["role"] == "system" for m in messages[:i]) for i in weighted)
    return max(0, len(weighted) - len(spans) - opening)  # (without a template an opening turn has its span)


def awaits_answer(row: dict) -> bool:
    """A row to be answered: no output, or a conversation whose last turn is not the assistant's."""
    return answer(row) is None if "messages" not in row else row["messages"][-1]["role"] != "assistant"


def question(row: dict, scored: bool = False) -> str:
    """What the answer replies to (for reports): the instruction (and input), or in a
    conversation the last user turn before its last assistant turn, the answer a reference
    scores (`scored`) or a prompt is rendered for; a conversation awaiting an answer (not
    `scored`) is answered after its last user turn."""
    if "messages" not in row:
        return row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    messages = row["messages"]
    last = _last_assistant(messages)
    end = len(messages) if last is None or not scored and awaits_answer(row) else last
    users = [m["content"] for m in messages[:end] if m["role"] == "user"]
    return users[-1] if users else ""


def with_answer(row: dict, text: str) -> dict:
    """The same row answered with `text` (its last assistant turn replaced, or added)."""
    if "messages" not in row:
        return {**row, "output": text}
    messages = list(row["messages"])
    last = _last_assistant(messages)
    if last is not None and last == len(messages) - 1:
        messages[last] = {"role": "assistant", "content": text}
    else:
        messages.append({"role": "assistant", "content": text})
    return {"messages": messages}


def system_of(row: dict, fmt: PromptFormat) -> str | None:
    """The system prompt the row renders with (its own first turn, else the format's)."""
    if "messages" in row and row["messages"][0]["role"] == "system":
        return row["messages"][0]["content"]
    return fmt.system_prompt


def _last_assistant(messages: list[dict]) -> int | None:
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return idx[-1] if idx else None


def _conversation(row: dict, fmt: PromptFormat) -> list[dict]:
    """The row as chat messages, with the format's system prompt first when it has none."""
    if "messages" in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]  # (not a turn's weight)
    else:
        user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
        messages = [{"role": "user", "content": user}]
        if row["output"] is not None:
            messages.append({"role": "assistant", "content": row["output"]})
    if fmt.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": fmt.system_prompt})
    return messages


# ---------------------------------------------------------------- rendering


def render(row: dict, fmt: PromptFormat, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """(training text, trainable character spans): each answer and the end-of-turn after it,
    from the spaces before it (_over_spaces)."""
    text, spans, _ = render_turns(row, fmt, tokenizer)
    return text, spans


def render_turns(row: dict, fmt: PromptFormat, tokenizer) -> tuple[str, list[tuple[int, int]], list[int]]:
    """render(), with the answer each span trains: its place among the row's assistant turns
    (0-based; a chat template's untrained turns have no span)."""
    text, spans, turns = _render(row, fmt, tokenizer)
    if fmt.answer_over_spaces:
        spans = [(_over_spaces(text, start), end) for start, end in spans]
    return text, spans, turns


def _over_spaces(text: str, start: int) -> int:
    """Where an answer's span starts: before the spaces that end its prompt ("Answer: ").
    Byte-level BPE and SentencePiece join a space to the word after it (" Paris"); with the
    span starting at "P", that token lay half outside it, so the answer's first word was never
    learned, and a prompt cut there ended in a lone space token no training row has. Now the
    prompt ends before its spaces and the first labelled token carries them. A newline stays in
    the prompt: these tokenizers keep it apart from the word after it."""
    while start > 0 and text[start - 1] in " \t":
        start -= 1
    return start


def _render(row: dict, fmt: PromptFormat, tokenizer) -> tuple[str, list[tuple[int, int]], list[int]]:
    eos = tokenizer.eos_token or ""
    if "messages" in row and any(not m.get("weight", 1) for m in row["messages"]):
        # Turns after the last answer of weight 1 train nothing: rendered without them, that
        # answer is the text's last turn, which a template renders as the full text does (a
        # template that renders a turn otherwise once later turns follow left it no span).
        weighted = [i for i, m in enumerate(row["messages"]) if m["role"] == "assistant" and m.get("weight", 1)]
        row = {**row, "messages": row["messages"][: weighted[-1] + 1]} if weighted else row
    if fmt.chat_template:
        messages = _conversation(row, fmt)
        full = _apply_template(tokenizer, messages)
        spans, turns = [], []
        weights = _weights(row, messages)
        for i, m in enumerate(messages):
            # An opening assistant turn (a ShareGPT greeting) answers nothing: no template
            # renders the empty prompt before it (transformers refuses an empty conversation;
            # SmolLM2's adds its default system turn only to a non-empty one). Context, untrained,
            # as is a turn of weight 0.
            if m["role"] != "assistant" or not weights[i] or not any(x["role"] != "system" for x in messages[:i]):
                continue
            before = _apply_template(tokenizer, messages[:i], add_generation_prompt=True)
            after = _apply_template(tokenizer, messages[: i + 1])
            if not after.startswith(before):
                raise DataError("the tokenizer's chat template does not render conversations prefix-stably; "
                                "set data.chat_turn_template and remove the tokenizer's chat template")
            # A template may render a turn otherwise once later turns follow (Qwen3 gives only
            # the turns after the last user turn a <think> block): such a turn's span measured
            # alone would land elsewhere in the full text. It stays as context, untrained, and
            # is counted (untrained_turns); the last turn always renders as the full text does.
            if full.startswith(after):
                spans.append((len(before), len(after)))
                turns.append(sum(x["role"] == "assistant" for x in messages[:i]))
        return full, spans, turns
    system = _system_block(row, fmt)
    if "messages" not in row:
        prompt = system + _instruction_prompt(row, fmt)
        text = prompt + row["output"] + eos
        return text, [(len(prompt), len(text))], [0]
    head, tail = fmt.chat_turn_template.split("{content}", 1)
    text, spans, turns, answers = "", [], [], 0
    messages = _conversation(row, fmt)
    for m, weight in zip(messages, _weights(row, messages)):
        text += head.format(role=m["role"])
        if m["role"] == "assistant":
            start = len(text)
            text += m["content"] + eos
            if weight:  # (weight 0: context, untrained)
                spans.append((start, len(text)))
                turns.append(answers)
            answers += 1
        else:
            text += m["content"]
        text += tail.format(role=m["role"])
    return text, spans, turns


def _weights(row: dict, messages: list[dict]) -> list[int]:
    """Each rendered turn's weight (1, or 0 for an assistant turn given weight 0): the row's
    turns, after a system turn the format puts first."""
    own = [m.get("weight", 1) for m in row["messages"]] if "messages" in row else [1] * len(messages)
    return [1] * (len(messages) - len(own)) + own


def chat_template_of(fmt: PromptFormat, tokenizer) -> str:
    """A Jinja chat template that renders a conversation as this run trained on it without one
    (data.chat_turn_template, the format's system prompt, EOS after each answer, BOS first),
    written into an exported tokenizer that has none: plain transformers' apply_chat_template
    and servers that read it ask the model as training did. The generation prompt is the
    assistant's turn header without its trailing spaces, as prompt_text cuts it."""
    head, tail = fmt.chat_turn_template.split("{content}", 1)

    def text(value: str) -> str:  # a Jinja string literal (its escapes are Python's)
        return f"{{{{ {json.dumps(value, ensure_ascii=False)} }}}}" if value else ""

    def pieces(template: str, role: str | None) -> str:  # {role} from the message, or `role`
        out = ""
        for literal, name, _, _ in string.Formatter().parse(template):
            out += text(literal)
            if name is not None:
                out += text(role) if role else "{{ message['role'] }}"
        return out

    system = ""
    if fmt.system_prompt is not None:
        system = ("{%- if not messages or messages[0]['role'] != 'system' -%}"
                  + pieces(head, "system") + text(fmt.system_prompt) + pieces(tail, "system") + "{%- endif -%}")
    generation = head.format(role="assistant")
    if fmt.answer_over_spaces:
        generation = generation.rstrip(" \t")
    return ("{{- bos_token if bos_token else '' -}}" if tokenizer.bos_token else "") + system + (
        "{%- for message in messages -%}" + pieces(head, None) + "{{ message['content'] }}"
        "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}" + pieces(tail, None)
        + "{%- endfor -%}{%- if add_generation_prompt -%}" + text(generation) + "{%- endif -%}")


def typed_row(text: str, fmt: PromptFormat, where: str) -> dict:
    """A prompt a person typed (a line of predict's text file, `launcher generate --prompt`,
    eval.generation_prompts) as a row to answer: it fills data.prompt's column when that names
    one, as training's rows did; else it is the instruction itself (`_bare`, see prompt_text)."""
    names = placeholders(fmt.prompt) if fmt.prompt else []
    if len(set(names)) == 1:
        return normalize({names[0]: text}, fmt, where, need_answer=False) | {"_bare": False}
    return normalize({"instruction": text}, fmt.replace(prompt=None, response=None), where, need_answer=False) | {"_bare": True}


def prompt_text(row: dict, fmt: PromptFormat, tokenizer, bare: bool = False) -> str:
    """What the model reads before its answer: the training text up to the last answer (for a
    row without one, up to where it would start). Cut from `render` itself, so the identity
    training text = prompt + (the template's spaces) + answer + end-of-turn holds by construction. `bare`: a prompt
    typed by a user ({"instruction": TEXT}), a chat turn when the run trained on conversations."""
    text, spans = _asked(row, fmt, tokenizer, bare)
    return text[: spans[-1][0]]


def prompt_ids(row: dict, fmt: PromptFormat, tokenizer, bare: bool = False) -> list[int]:
    """The ids of prompt_text, tokenized as training tokenized them: in pieces cut where each
    earlier answer starts (answer_cuts), so they are the training row's ids before its last answer."""
    text, spans = _asked(row, fmt, tokenizer, bare)
    prompt = text[: spans[-1][0]]
    return token_ids(prompt, tokenizer, answer_cuts(spans[:-1], fmt))


def _asked(row: dict, fmt: PromptFormat, tokenizer, bare: bool) -> tuple[str, list[tuple[int, int]]]:
    """render() of the row with its last answer empty when it awaits one (prompt_text)."""
    if "messages" not in row:
        row = {"input": "", "output": None, **row}
        if bare and not fmt.chat_template and fmt.style == "chat":
            row = {"messages": [{"role": "user", "content": question(row)}]}
    given = row
    if awaits_answer(row):  # where the next answer would start (after the last turn, for predict)
        row = with_answer(row, "")
    text, spans = render(row, fmt, tokenizer)
    if not spans:  # only an opening assistant turn (render's chat-template path), or no turn but the system's
        # (told apart on the row as given: the answer added above is an assistant turn in every row)
        turns = given.get("messages", [{"role": "user"}])
        raise DataError("the conversation's only assistant turn comes before any user turn: nothing to answer"
                        if any(m["role"] in ("user", "assistant") for m in turns) else
                        "the conversation has no user turn: nothing to answer")
    return text, spans


def _apply_template(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template; a conversation it refuses (a system turn it does not
    support, roles that must alternate) is a data problem, not a crash."""
    # ValueError: transformers' own refusals (an empty conversation).
    refused: tuple[type[BaseException], ...] = (ValueError,)
    try:
        from jinja2 import TemplateError

        refused = (TemplateError, ValueError)
    except ImportError:  # transformers then cannot render any template either: let it say so
        pass
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except refused as e:
        raise DataError(f"the tokenizer's chat template refuses this conversation ({e}); "
                        "check the roles, or set data.system_prompt=null if the template takes no system turn") from None


def _instruction_prompt(row: dict, fmt: PromptFormat) -> str:
    template = fmt.prompt_template if row["input"] else fmt.prompt_template_no_input
    return template.format(instruction=row["instruction"], input=row["input"])


def _system_block(row: dict, fmt: PromptFormat) -> str:
    """Without a chat template, an instruction row's system prompt is a paragraph before it."""
    if "messages" in row or not fmt.system_prompt:
        return ""
    return fmt.system_prompt + "\n\n"


def token_ids(text: str, tokenizer, cuts: list[int] | None = None) -> list[int]:
    """The ids of rendered text: no special tokens added, except a BOS the text lacks; tokenized in
    pieces between `cuts` (tokenize_at)."""
    (ids, _), = tokenize_at([text], [cuts or []], tokenizer)
    return with_bos(ids, text, tokenizer)


def answer_cuts(spans, fmt: PromptFormat) -> list[int]:
    """Where a rendered row is cut into pieces before tokenizing: where each answer starts
    (none for an export trained on whole texts: fmt.answer_pieces)."""
    return [start for start, _ in spans] if fmt.answer_pieces else []


def tokenize_at(texts: list[str], cuts: list[list[int]], tokenizer) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, tokenized piece by piece between its cuts (one
    tokenizer call for the batch), so that no token spans a cut.

    Training cuts each row where its answers start (answer_cuts); inference cuts the prompt at
    the same places; so a prompt's ids are the training row's ids before that answer. Tokenized
    whole, a token could start in the prompt and end in the answer: SmolLM2's (GPT-2's rules)
    joins a prompt's last newline to an answer's leading spaces ("\n" + "    def" -> "ĊĠĠĠ",
    "Ġdef"); Llama-3's and Qwen's join a prompt's last punctuation to the answer's first word
    ("Label:" + "positive" -> ":positive"). That token was never learned, and generation, given
    the prompt alone, continued a prompt no row had trained. The answer's own piece tokenizes
    as the model generates it after the prompt.

    A tokenizer that marks the start of each text it is given (SentencePiece's prefix space, as
    in Llama-2's and Mistral's) would change every piece after the first: it is given whole texts
    (cuts_cleanly), as before; in those vocabularies a newline is a byte token that joins nothing."""
    if not cuts_cleanly(tokenizer):
        cuts = [[] for _ in texts]
    bounds = []
    for text, at in zip(texts, cuts):
        points = [0] + sorted({c for c in at if 0 < c < len(text)}) + [len(text)]
        bounds.append(list(zip(points, points[1:])) or [(0, 0)])
    pieces = [text[a:b] for text, pairs in zip(texts, bounds) for a, b in pairs]
    with settings_kept(tokenizer):
        enc = tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        return_token_type_ids=False)
    out, k = [], 0
    for pairs in bounds:
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for a, _ in pairs:
            ids += enc["input_ids"][k]
            offsets += enc["offset_mapping"][k] if a == 0 else [(a + x, a + y) for x, y in enc["offset_mapping"][k]]
            k += 1
        out.append((ids, offsets))
    return out


@functools.lru_cache(maxsize=16)
def cuts_cleanly(tokenizer) -> bool:
    """Whether texts tokenized in pieces give the same tokens as whole where the whole has a token
    boundary (before a word, after a newline): false for tokenizers that mark each text's start."""
    def ids(text):
        with settings_kept(tokenizer):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

    # Only what marks a start: pieces that begin with a space, and with a word after a newline.
    # (Not, say, "a." + "\nb": Llama-3's and Qwen's rules join punctuation to the newlines
    # after it, which says nothing about a start, and would have kept them whole.)
    return all(ids(a + b) == ids(a) + ids(b) for a, b in (("Answer:", " yes"), ("user\n", "yes")))


def with_bos(ids: list[int], text: str, tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    if bos is not None and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        return [bos] + ids
    return ids
