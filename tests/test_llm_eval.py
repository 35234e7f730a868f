"""One prompt function, data in the shapes people have, and generation-based evaluation, on tiny
models and tokenizers (the real SmolLM2 is tests/test_smollm2.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.config import DataConfig, load_config
from launcher.data import instructions, prompts
from launcher.data.instructions import IGNORE, encode, last_answer_start
from launcher.data.prompts import PromptFormat
from launcher.data.tokenizer import train_lm_tokenizer
from launcher.errors import ConfigError, DataError
from launcher.tasks import generation

from conftest import CONFIGS, OFFLINE_ENV, check, launcher

SFT = CONFIGS / "train" / "sft_tiny.yaml"
CHAT_TEMPLATE = ("{% for m in messages %}{% if m.role == 'assistant' %}[bot] {{ m.content }}{{ eos_token }}"
                 "{% else %}[{{ m.role }}] {{ m.content }} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}[bot] {% endif %}")


@pytest.fixture(scope="module")
def tok():
    words = ("### instruction : input response < | system | > < | user | > < | assistant | > [ bot ] [ user ] [ system ] "
             "is this clause fair ? the provider may change terms at any time unfair other arbitration be brief "
             "hello there general kenobi answer with one word").split()
    return train_lm_tokenizer([" ".join(words)], 300, 128)


@pytest.fixture(scope="module")
def chat_tok(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = CHAT_TEMPLATE
    return t


ROWS = [
    {"instruction": "is this clause fair?", "input": "the provider may change terms at any time", "output": "unfair"},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                  {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "is this clause fair?"},
                  {"role": "assistant", "content": "other"}]},
]


# ---------------------------------------------------------------- one prompt function


@pytest.mark.parametrize("template", [False, True], ids=["templates", "chat-template"])
@pytest.mark.parametrize("system", [None, "answer with one word"])
def test_training_text_is_the_generation_prompt_plus_the_answer(template, system, tok, chat_tok):
    """For every row shape, with and without a chat template and a system prompt: the text a row
    trains on is exactly the prompt it is answered from plus its answer and end-of-turn, and the
    training tokens start with the prompt's tokens (what generate and predict feed the model)."""
    t = chat_tok if template else tok
    fmt = PromptFormat.from_config(DataConfig(system_prompt=system), t)
    assert fmt.chat_template == template
    for row in ROWS:
        text, spans = prompts.render(row, fmt, t)
        prompt = prompts.prompt_text(row, fmt, t)
        start, end = spans[-1]  # the span starts over the template's spaces ("[bot] ")
        assert text[:start] == prompt and text[start:end].lstrip(" ") == prompts.answer(row) + t.eos_token
        ids, labels = encode(row, fmt, t)
        prompt_ids = prompts.prompt_ids(row, fmt, t)
        assert t.decode(prompt_ids, skip_special_tokens=True) == t.decode(prompts.token_ids(prompt, t), skip_special_tokens=True)
        assert ids[: len(prompt_ids)] == prompt_ids and last_answer_start(labels) == len(prompt_ids)
        if system and "messages" not in row:  # the configured system prompt reaches rows without one
            assert system in prompt
    # A conversation with its own system prompt keeps it; the configured one fills in elsewhere.
    assert "be brief" in prompts.prompt_text(ROWS[1], fmt, t) and (system is None or system not in prompts.prompt_text(ROWS[1], fmt, t))


@pytest.fixture(scope="module")
def bpe_tok():
    """A byte-level BPE tokenizer (GPT-2's, Llama-3's and SmolLM2's kind): a space joins the word after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Question: what is the capital of France?\nAnswer: Paris", "Answer: Paris or Rome",
                             "user: hello\nassistant: Paris"] * 20,
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("row, change", [
    ({"instruction": "what is the capital of France?", "input": "", "output": "Paris"},
     {"prompt_template_no_input": "Question: {instruction}\nAnswer: "}),
    ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris"}]},
     {"chat_turn_template": "{role}: {content}\n"}),
], ids=["instruction-template", "chat-turn-template"])
def test_a_template_ending_in_a_space_trains_the_answers_first_word(bpe_tok, row, change):
    """Byte-level BPE joins a template's last space to the answer's first word (" Paris"). That
    token lay half outside the answer's span: it was never labelled (the row trained on "</s>"
    alone), and the prompt generate/predict send ended in a lone space token. Now the labelled
    tokens are the whole answer with its space, and the prompt is the tokens before them."""
    fmt = PromptFormat.from_config(DataConfig(**change), bpe_tok)
    assert not fmt.chat_template
    ids, labels = encode(row, fmt, bpe_tok)
    assert " Paris" in bpe_tok.convert_tokens_to_string(bpe_tok.convert_ids_to_tokens(bpe_tok(" Paris")["input_ids"]))
    assert bpe_tok.decode([x for x in labels if x != IGNORE]) == " Paris</s>"
    prompt = prompts.prompt_text(row, fmt, bpe_tok)
    assert not prompt.endswith(" ") and prompts.prompt_ids(row, fmt, bpe_tok) == ids[: last_answer_start(labels)]
    bare = prompts.prompt_text({k: v for k, v in row.items() if k != "output"} if "messages" not in row
                               else {"messages": row["messages"][:1]}, fmt, bpe_tok)
    assert bare == prompt
    # An export written before the rule trained with the spaces in its prompt: it keeps them.
    old = PromptFormat.from_json({"prompt": {k: v for k, v in fmt.to_json().items() if k != "answer_over_spaces"}})
    assert PromptFormat.from_json({"prompt": fmt.to_json()}) == fmt and prompts.prompt_text(row, old, bpe_tok) == prompt + " "


# Llama-3's pre-tokenizer rule (Qwen2's is alike): a word takes one character before it that is
# not a letter, a digit or a line break (":positive"), punctuation takes the newlines after it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_bpe(corpus: list[str], split: str = "gpt2"):
    """A BPE tokenizer trained on `corpus`: byte-level with GPT-2's rules (SmolLM2's kind) or
    Llama-3's ("llama3"), or ("metaspace") with SentencePiece's ▁ for spaces and a ▁ put before
    each text given (Llama-2's, Mistral's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    if split == "metaspace":  # newlines apart (SentencePiece's byte tokens), a ▁ before the text's first word
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Metaspace(prepend_scheme="first")])
        bpe.decoder = decoders.Metaspace(prepend_scheme="first")
    elif split == "llama3":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        bpe.decoder = decoders.ByteLevel()
    else:
        bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    alphabet = [] if split == "metaspace" else pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")


CODE = "    if x:\n        return y"


@pytest.mark.parametrize("split, answer, templates", [
    # GPT-2's rules (SmolLM2): a newline joins the spaces after it ("ĊĠĠĠ").
    ("gpt2", CODE, ({}, {"chat_turn_template": "{role}:\n{content}\n"})),
    # Llama-3's: a word joins the punctuation before it (":positive").
    ("llama3", "positive", ({"prompt_template_no_input": "{instruction}\nLabel:"}, {"chat_turn_template": "{role}:{content}\n"})),
], ids=["gpt2-newline-indent", "llama3-colon-word"])
def test_an_answer_a_token_would_join_to_its_prompt_is_learned_whole_and_asked_with_the_training_prompt(split, answer, templates):
    """Tokenized whole, a token could start in the prompt and end in the answer: GPT-2's rules
    (SmolLM2's) merge a prompt's last newline with an answer's leading spaces ("ĊĠĠĠ"), Llama-3's
    a prompt's last colon with the answer's first word (":positive"). That token was left
    unlabelled (the answer's indent or first word never learned), and the prompt generate and
    predict send (tokenized alone) was not the training row's ids before its answer. Rows are now
    tokenized in pieces cut where each answer starts, and prompts at the same places: every
    answer, including an earlier one of a conversation, is learned whole, and its prompt's ids
    are the training ids before it, through encode, the datasets encoder and prompt_ids. An
    export written before (no answer_pieces in its format) keeps whole texts, as it was trained."""
    import datasets

    t = _byte_bpe([f"### Instruction:\nwrite code\n\n### Response:\n{answer}", f"user: write code\nassistant:\n{answer}\n",
                   f"write code\nLabel:{answer}", f"user:write code\nassistant:{answer}\n"], split)
    assert prompts.cuts_cleanly(t)
    instruction = {"instruction": "write code", "input": "", "output": answer}
    convo = {"messages": [{"role": "user", "content": "write code"}, {"role": "assistant", "content": answer},
                          {"role": "user", "content": "write code"}, {"role": "assistant", "content": "ok"}]}
    for row, change in zip((instruction, convo), templates):
        fmt = PromptFormat.from_config(DataConfig(**change), t)
        ids, labels = encode(row, fmt, t)
        text, spans = prompts.render(row, fmt, t)
        whole = t(text, add_special_tokens=False, return_offsets_mapping=True)
        assert any(a < spans[0][0] < b for a, b in whole["offset_mapping"])  # tokenized whole, a token straddles the first answer's start
        answers = [prompts.answer(prompts.through_answer(row, k)) if "messages" in row else row["output"] for k in range(len(spans))]
        learned = t.decode([x for x in labels if x != IGNORE])
        assert learned == "".join(a + t.eos_token for a in answers), learned
        for k in range(len(spans)):  # each answer's prompt, as inference sends it, is the ids before it
            asked = prompts.through_answer(row, k) if "messages" in row else row
            start = last_answer_start(encode(asked, fmt, t)[1])
            assert prompts.prompt_ids(asked, fmt, t) == ids[:start]
            assert t.decode(ids[start:]).startswith(answers[k])
        enc = instructions.InstructionEncoder(DataConfig(**change), t, fmt)
        ds = datasets.Dataset.from_list([row])
        table, _ = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))
        assert table["input_ids"][0] == ids and table["labels"][0] == labels
        old = PromptFormat.from_json({"prompt": {k: v for k, v in fmt.to_json().items() if k != "answer_pieces"}})
        assert PromptFormat.from_json({"prompt": fmt.to_json()}) == fmt and not old.answer_pieces
        assert encode(row, old, t)[0] == prompts.with_bos(whole["input_ids"], text, t)
        assert prompts.prompt_ids(row, old, t) == prompts.token_ids(prompts.prompt_text(row, old, t), t)


def test_a_tokenizer_that_marks_each_texts_start_tokenizes_rows_whole():
    """SentencePiece-style tokenizers put ▁ before every text they are given: tokenized in pieces,
    an answer would open with a ▁ training never had. They are given whole texts, as before, and
    the prompt's ids are still the training ids before the answer (their newlines join nothing)."""
    t = _byte_bpe(["Question: what is the capital of France?\nAnswer: Paris", "user:\nhello\nassistant:\nParis"], "metaspace")
    assert t.convert_ids_to_tokens(t("Paris")["input_ids"])[0].startswith("▁")
    assert not prompts.cuts_cleanly(t)
    for row, change in (({"instruction": "what is the capital of France?", "input": "", "output": "Paris"},
                         {"prompt_template_no_input": "Question: {instruction}\nAnswer: "}),
                        ({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Paris"}]},
                         {"chat_turn_template": "{role}:\n{content}\n"})):
        fmt = PromptFormat.from_config(DataConfig(**change), t)
        ids, labels = encode(row, fmt, t)
        text, _ = prompts.render(row, fmt, t)
        assert ids == prompts.with_bos(t(text, add_special_tokens=False)["input_ids"], text, t)
        assert prompts.prompt_ids(row, fmt, t) == ids[:last_answer_start(labels)]
        assert t.decode([x for x in labels if x != IGNORE]).strip() == "Paris</s>"


def test_answers_stop_at_the_first_special_token_after_the_answer(tok):
    """The answer frame's end is the special token the template puts after an answer, not one it puts
    between the generation prompt and the answer (gpt-oss's channel markers): with that one as
    a stop, every answer ended before its first token."""
    import copy

    from launcher.tasks import causal_lm

    t = copy.deepcopy(tok)
    t.add_tokens(["<|start|>", "<|channel|>", "<|message|>", "<|return|>", "<|end|>"], special_tokens=True)
    t.chat_template = ("{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final"
                       "<|message|>{{ m.content }}<|return|>{% else %}<|message|>{{ m.content }}<|end|>{% endif %}"
                       "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")
    fmt = PromptFormat.from_config(DataConfig(), t)
    assert t.convert_ids_to_tokens(causal_lm.answer_frame(fmt, t).end) == "<|return|>"
    assert causal_lm.answer_frame(PromptFormat.from_config(DataConfig(), tok), tok) == generation.AnswerFrame("", tok.eos_token_id)


# Qwen3's rule in small: assistant turns after the last user turn open with a think block.
LATER_TURNS_DIFFER = ("{% set ns = namespace(last=0) %}{% for m in messages %}{% if m.role == 'user' %}"
                      "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
                      "{% if m.role == 'assistant' %}[bot] {% if loop.index0 > ns.last %}[think] {% endif %}"
                      "{{ m.content }}{{ eos_token }}{% else %}[{{ m.role }}] {{ m.content }} {% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}[bot] {% endif %}")


def test_a_turn_the_template_renders_otherwise_once_later_turns_follow_is_context_and_counted(tok):
    """Qwen3's template renders an assistant turn with a think block while it is the last, and
    without one once a user turn follows. Each turn's span was measured on the conversation cut
    after it and applied to the whole: the earlier answer's labels slid onto the next user turn.
    Now that turn is context only, the last is trained as the full text renders it, and the
    encoder counts the turns left untrained (said in the data line)."""
    import copy

    import datasets

    t = copy.deepcopy(tok)
    t.chat_template = LATER_TURNS_DIFFER
    fmt = PromptFormat.from_config(DataConfig(), t)
    text, spans = prompts.render(ROWS[1], fmt, t)
    assert "[bot] general kenobi</s>" in text and [text[s:e] for s, e in spans] == [" [think] other</s>"]
    enc = instructions.InstructionEncoder(DataConfig(), t, fmt)
    ds = datasets.Dataset.from_list([{"messages": ROWS[1]["messages"]}] * 3)
    _, stats = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))
    assert stats["untrained_turns"] == 3
    assert "3 earlier assistant turns kept as context, untrained" in instructions.EncodeStats(**stats).line("train")
    one_turn = {"messages": [ROWS[1]["messages"][1], ROWS[1]["messages"][2]]}  # nothing follows: trained as before
    assert prompts.untrained_turns(one_turn, prompts.render(one_turn, fmt, t)[1]) == 0


@pytest.mark.parametrize("template", [False, True], ids=["templates", "chat-template"])
def test_a_conversation_cut_before_its_last_answer_is_scored_against_the_answer_it_asks_for(template, tok, chat_tok):
    """A validation conversation cut by max_length after its first answer is answered from the
    prompt before that answer (the last labelled run). Its reference was the lost last answer
    and its question the last user turn: the model was asked turn 1 and marked against turn 2.
    Now the reference and question are those of the last answer the cut leaves, in the run's
    validation rows (datasets path) and in `launcher eval`'s (encode_rows); uncut rows keep theirs."""
    import datasets

    t = chat_tok if template else tok
    fmt = PromptFormat.from_config(DataConfig(), t)
    row = ROWS[1]  # system, user "hello there", assistant "general kenobi", user, assistant "other"
    ids, labels = encode(row, fmt, t)
    first = prompts.through_answer(row, 0)
    assert prompts.answer(first) == "general kenobi" and prompts.question(first) == "hello there"
    first_ids, _ = encode(first, fmt, t)
    cut = len(first_ids) + 2  # past the first answer, before the second
    assert ids[:len(first_ids)] == first_ids and cut < last_answer_start(labels)
    for max_length, want in ((cut, first), (len(ids), row)):
        cfg = DataConfig(max_length=max_length)
        kept: list = []
        rows_ids, rows_labels, _ = instructions.encode_rows([row], cfg, t, fmt, kept)
        enc = instructions.InstructionEncoder(cfg, t, fmt)
        ds = datasets.Dataset.from_list([{"messages": row["messages"]}])
        table, _ = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))
        got = [(prompts.answer(r), prompts.question(r)) for r in kept]
        assert got == [(prompts.answer(want), prompts.question(want))]
        assert list(zip(table["answer"], table["question"])) == got
        # The prompt it is answered from is the reference's own prompt.
        prompt_ids = prompts.prompt_ids(want, fmt, t)
        assert rows_ids[0][: last_answer_start(rows_labels[0])] == prompt_ids


def test_a_reply_is_scored_without_the_text_the_template_puts_before_every_answer(tok, chat_tok):
    """Qwen3's template opens the final answer with an empty think block whose tags are not
    special tokens: the tuned model writes it first, and its replies decoded as
    "<think></think> Yo" against the reference "Yo" (exact match 0 for a right answer). The
    answer frame's lead is that text as a reply decodes it; replies are scored without it."""
    import copy

    from launcher.tasks import causal_lm

    t = copy.deepcopy(tok)
    t.chat_template = LATER_TURNS_DIFFER
    frame = causal_lm.answer_frame(PromptFormat.from_config(DataConfig(), t), t)
    assert frame.lead and frame.end == t.eos_token_id
    said = t.decode(t("[think] other</s>", add_special_tokens=False)["input_ids"], skip_special_tokens=True)  # as generated
    assert said.strip() != "other" and frame.reply(said) == "other" and frame.reply(" other ") == "other"
    assert causal_lm.answer_frame(PromptFormat.from_config(DataConfig(), chat_tok), chat_tok).lead == ""


def test_the_recorded_format_renders_the_same_after_a_round_trip(chat_tok):
    fmt = PromptFormat.from_config(DataConfig(system_prompt="be brief", prompt="{text}", response="{label}"), chat_tok)
    again = PromptFormat.from_json(json.loads(json.dumps({"prompt": fmt.to_json()})))
    assert again == fmt
    row = prompts.normalize({"text": "the provider may change terms", "label": "unfair"}, again, "x")
    assert prompts.prompt_text(row, again, chat_tok) == prompts.prompt_text(row, fmt, chat_tok)
    # An export from before the format was recorded: its flat template keys still apply.
    old = PromptFormat.from_json({"prompt_template": "Q: {instruction} {input}\nA: ", "prompt_format": "chat"})
    assert old.prompt_template == "Q: {instruction} {input}\nA: " and old.style == "chat"


def test_a_conversation_awaiting_an_answer_is_answered_after_its_last_turn(chat_tok, tok):
    """predict on [user, assistant, user]: the prompt runs to the assistant turn after the last
    user turn, not to the earlier answer."""
    row = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"},
                        {"role": "user", "content": "is this clause fair?"}]}
    for t in (chat_tok, tok):
        fmt = PromptFormat.from_config(DataConfig(), t)
        prompt = prompts.prompt_text(prompts.normalize(row, fmt, "x", need_answer=False), fmt, t)
        full = prompts.render(prompts.with_answer(row, "unfair"), fmt, t)[0]
        assert "is this clause fair?" in prompt and full.startswith(prompt) and full[len(prompt):].lstrip(" ").startswith("unfair")


def test_a_chat_template_that_refuses_a_conversation_is_a_data_error(tok):
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }} {% endfor %}")
    fmt = PromptFormat.from_config(DataConfig(system_prompt="be brief"), strict)
    with pytest.raises(DataError) as e:
        prompts.render(ROWS[0], fmt, strict)
    assert "chat template refuses this conversation (System role not supported)" in e.value.problems[0]


def test_a_conversation_that_opens_with_the_assistant_trains_its_answers_after_a_question(chat_tok):
    """ShareGPT dumps often open with a greeting from `gpt`. With the tokenizer's chat template
    the prompt before that turn is an empty conversation, which transformers refuses with a
    ValueError: data preparation died in a traceback. The greeting answers nothing: it stays as
    context, untrained, and the answer after the question trains. It is not counted among the
    turns a template renders otherwise once later turns follow (its note blamed Qwen3's <think>
    blocks for it); a row with the greeting alone is counted as one with no answer to learn
    (test_sft)."""
    row = {"conversations": [{"from": "gpt", "value": "hello there"}, {"from": "human", "value": "is this clause fair?"},
                             {"from": "gpt", "value": "unfair"}]}
    for system in (None, "be brief"):
        fmt = PromptFormat.from_config(DataConfig(system_prompt=system), chat_tok)
        normal = prompts.normalize(row, fmt, "x")
        text, spans = prompts.render(normal, fmt, chat_tok)
        assert [text[a:b].lstrip(" ") for a, b in spans] == ["unfair" + chat_tok.eos_token], (system, text, spans)
        assert text.index("hello there") < text.index("is this clause fair?") and prompts.untrained_turns(normal, spans) == 0
        ids, labels = encode(normal, DataConfig(system_prompt=system), chat_tok)
        assert chat_tok.decode([t for t in labels if t != IGNORE]).replace(" ", "") == "unfair" + chat_tok.eos_token
    with pytest.raises(DataError, match="chat template refuses this conversation"):  # one line, not a traceback
        prompts._apply_template(chat_tok, [])
    # predict on a conversation whose only assistant turn is the greeting: nothing to answer
    fmt = PromptFormat.from_config(DataConfig(), chat_tok)
    with pytest.raises(DataError, match="only assistant turn comes before any user turn"):
        greeting = {"messages": [{"role": "assistant", "content": "hello there"}]}
        prompts.prompt_text(prompts.normalize(greeting, fmt, "x", need_answer=False), fmt, chat_tok)


# ---------------------------------------------------------------- shapes and column mapping


def test_a_scored_conversation_that_ends_with_a_question_reports_the_question_its_answer_replies_to(tok):
    """A validation conversation ending in an unanswered user turn is scored on its last
    answer, given after the turn before: the run's predictions and samples showed the later,
    unanswered question beside that answer."""
    import datasets

    row = {"messages": [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": "later question"}]}
    fmt = PromptFormat.from_config(DataConfig(), tok)
    enc = instructions.InstructionEncoder(DataConfig(), tok, fmt)
    ds = datasets.Dataset.from_list([row])
    table, _ = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))
    assert list(zip(table["answer"], table["question"])) == [("first answer", "first question")]
    kept: list = []
    instructions.encode_rows([row], DataConfig(), tok, fmt, kept)
    assert prompts.question(kept[0], scored=True) == "first question"
    assert prompts.question(row) == "later question"  # to be answered (predict): after its last turn


def test_every_accepted_row_shape_renders_like_its_plain_equivalent(chat_tok):
    fmt = PromptFormat.from_config(DataConfig(), chat_tok)
    plain = prompts.render({"messages": [{"role": "user", "content": "hello there"},
                                         {"role": "assistant", "content": "general kenobi"}]}, fmt, chat_tok)
    shapes = [
        {"instruction": "hello there", "output": "general kenobi"},
        {"prompt": "hello there", "completion": "general kenobi"},  # TRL prompt-completion
        {"prompt": [{"role": "user", "content": "hello there"}],  # TRL conversational
         "completion": [{"role": "assistant", "content": "general kenobi"}]},
        {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "general kenobi"}]},
    ]
    for record in shapes:
        assert prompts.render(prompts.normalize(record, fmt, "f:1"), fmt, chat_tok) == plain, record
    mapped = fmt.replace(prompt="{sentence}", response="{verdict}")
    assert prompts.render(prompts.normalize({"sentence": "hello there", "verdict": "general kenobi", "id": 3}, mapped, "f:1"),
                          mapped, chat_tok) == plain


@pytest.mark.parametrize("turn, system", [
    (None, None), (None, "answer with one word"),
    ("{role}: {content}\n", None),  # a header ending in a space: the generation prompt stops before it
    ('[{role}] {{"q": \\ é 😀}} {content}\t\n', 'be "brief" \\ {{x}} é 😀'),  # what a Jinja literal must escape
], ids=["default", "system", "spaces", "escapes"])
def test_an_export_without_a_chat_template_gets_one_that_renders_as_training_did(turn, system, tok, bpe_tok):
    """A run that trained on conversations with data.chat_turn_template writes a chat template
    into its export's tokenizer (it had none: apply_chat_template raised). Plain transformers
    then renders a conversation as training did (BOS first, the system prompt where a row has
    none), asks the model with the ids launcher asks it with, and a run continued from the
    export (whose tokenizer now has a template) trains on the same ids and labels."""
    import copy

    convs = [ROWS[1]["messages"], [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"},
                                   {"role": "user", "content": "is this clause fair?"}, {"role": "assistant", "content": "other"}]]
    for t in (tok, bpe_tok):
        cfg = DataConfig(system_prompt=system, **({"chat_turn_template": turn} if turn else {}))
        fmt = PromptFormat.from_config(cfg, t).replace(style="chat")
        saved = copy.deepcopy(t)
        saved.chat_template = prompts.chat_template_of(fmt, t)
        assert PromptFormat.from_config(cfg, saved).chat_template
        for messages in convs:
            row = {"messages": messages}
            assert saved.apply_chat_template(messages, tokenize=False) == t.bos_token + prompts.render(row, fmt, t)[0]
            asked = {"messages": messages[:-1]}
            assert saved.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"] == prompts.prompt_ids(asked, fmt, t)
            again = PromptFormat.from_config(cfg, saved).replace(style="chat")
            (ids, labels), (ids2, labels2) = encode(row, fmt, t), encode(row, again, saved)
            assert ids2 == ids
            # The same answers, and with them (as under any chat template) the turn's closing
            # text after each EOS: a span runs to the end of the rendered turn.
            extra = [i for i, (a, b) in enumerate(zip(labels, labels2)) if a != b]
            assert all(labels[i] == IGNORE and labels2[i] == ids[i] for i in extra)
            assert all(ids[i - 1] == t.eos_token_id or i - 1 in extra for i in extra)
            assert extra or t is tok  # (the WordPiece tokenizer has no token for the newline)


def test_a_bad_placeholder_is_one_line_at_config_time():
    for value, says in (("{}", "is not a column name"), ("{a.b}", "is not a column name"), ("no columns", "names no column"),
                        ("{text!r}", "no format spec or conversion"), ("{text", "is not a valid template")):
        with pytest.raises(ConfigError) as e:
            load_config(SFT, [f"data.prompt={value}", "data.response={label}"], check_files=False)
        assert len(e.value.problems) == 1 and e.value.problems[0].startswith("data.prompt: ") and says in e.value.problems[0]
    # One string for both prompt templates ({input} renders empty in the second) is fine; a turn
    # template is split at its one literal {content}.
    load_config(SFT, ["data.prompt_template_no_input=Q: {instruction} {input}\nA:"], check_files=False)
    for turn in ("{role}: {content!s}\n", "{role}: {content} {content}\n"):
        with pytest.raises(ConfigError) as e:
            load_config(SFT, [f"data.chat_turn_template={turn}"], check_files=False)
        assert e.value.problems == ["data.chat_turn_template: must contain {content} once, as written (no conversion or format spec)"]
    with pytest.raises(ConfigError) as e:
        load_config(SFT, ["data.prompt={text}"], check_files=False)
    assert e.value.problems == ["data.response: required with data.prompt (both map columns, e.g. data.prompt='{text}' "
                                "data.response='{label}')"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_columns_a_file_lacks_are_one_line_and_a_row_without_a_value_names_its_line(tmp_path):
    """Run through `launcher train` (exit 2, one line, nothing left behind): a placeholder naming
    no column of the file; no mapping and no known shape; a row whose mapped value is missing."""
    rows = [{"text": f"clause {i}", "category": "Other" if i % 2 else "Arbitration"} for i in range(40)]
    train = _write(tmp_path / "train.jsonl", rows)
    args = ["train", str(SFT), "--output-dir", str(tmp_path / "out"), "data.synthetic.enabled=false",
            f"data.train_file={train}", f"data.validation_file={train}"]
    proc = launcher(*args, "data.prompt=Classify: {tex}", "data.response={category}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: data.prompt: {{tex}} is not a column of {train} (its columns: text, category)"]
    proc = launcher(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"error: {train}: no instruction/output, messages, prompt/completion or conversations "
                                  "(ShareGPT) columns (its columns: text, category); map yours with data.prompt=")
    _write(train, rows[:5] + [{"text": "clause without a category"}] + rows[6:])
    proc = launcher(*args, "data.prompt=Classify: {text}", "data.response={category}")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {train}:6: no 'category' value for data.response ('{{category}}')"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- evaluation


def test_scores_on_answers_we_control():
    """Exact match after normalisation; over a closed set, greedy answers as classes (an answer
    outside the set counts against its reference) and likelihood choices, F1 per class as
    scikit-learn computes it."""
    from sklearn.metrics import f1_score

    cands = generation.Candidates(["Arbitration", "Other", "Unilateral change"], [[1], [2], [3]])
    refs = ["Other", "Other", "Arbitration", "Unilateral change", "Other"]
    responses = ["other.", "The Other", "arbitration!", "Unfair: unilateral change", "Arbitration"]
    choices = [1, 0, 0, 2, 1]
    rows = [{"index": i, "loss": 0.5 * i, "tokens": i + 1, "reference": r, "response": g, "choice": c}
            for i, (r, g, c) in enumerate(zip(refs, responses, choices))]
    m = generation.score(rows, cands)
    assert m["exact_match"] == pytest.approx(3 / 5)  # punctuation, case and articles do not count
    assert m["loss"] == pytest.approx(sum(0.5 * i for i in range(5)) / 15) and m["n"] == 5
    greedy = ["Other", "Other", "Arbitration", None, "Arbitration"]
    chosen = [cands.answers[c] for c in choices]
    for prefix, pred in (("", greedy), ("choice_", chosen)):
        assert m[f"{prefix}accuracy"] == pytest.approx(sum(p == r for p, r in zip(pred, refs)) / 5)
        labels = sorted({*refs, *(p for p in pred if p)})
        want = f1_score(refs, [p or "(none)" for p in pred], labels=labels, average=None, zero_division=0)
        assert [m[f"{prefix}f1/{name}"] for name in labels] == pytest.approx(list(want))
        assert m[f"{prefix}macro_f1"] == pytest.approx(float(want.mean()))
    assert "accuracy" not in generation.score(rows, None) and "exact_match" in generation.score(rows, None)
    # Letter answers are not articles: "A" matches "a." but not an empty reply or "The".
    letters = [{"index": i, "loss": 0.0, "tokens": 1, "reference": "A", "response": g} for i, g in enumerate(["", "The", "a.", "B"])]
    assert generation.score(letters, None)["exact_match"] == pytest.approx(1 / 4)
    assert generation.normalize("The cat") == generation.normalize("cat") and generation.normalize("An") == "an"


def test_answers_that_normalise_alike_are_one_class():
    """"Yes" and "yes" both in the closed set: a reply equal to its reference ("Yes") counted
    as an exact match but as a wrong class (the lookup kept the other spelling)."""
    cands = generation.Candidates(["No", "Yes", "yes"], [[1], [2], [3]])
    rows = [{"index": i, "loss": 0.0, "tokens": 1, "reference": r, "response": r, "choice": c}
            for i, (r, c) in enumerate([("Yes", 1), ("yes", 1), ("No", 0)])]
    m = generation.score(rows, cands)
    assert m["exact_match"] == m["accuracy"] == m["choice_accuracy"] == 1.0
    assert m["macro_f1"] == m["choice_macro_f1"] == 1.0


def test_closed_sets():
    from launcher.tasks.causal_lm import closed_set

    assert closed_set({"a": 5, "b": 3}, {"a": 2, "c": 1}) == ["a", "b", "c"]
    assert closed_set({f"answer {i}": 1 for i in range(30)}, None) is None  # free-form: every answer once
    assert closed_set({f"x{i}": 3 for i in range(51)}, None) is None and closed_set(None, {"a": 9}) is None


def test_ranks_share_the_rows_once_and_run_as_many_batches():
    rows = [{"input_ids": list(range(3 + i % 5)), "labels": [IGNORE] * 2 + list(range(2, 3 + i % 5)), "answer": "a",
             "question": "q"} for i in range(11)]
    for world, n_gen in ((1, 7), (2, 7), (3, 7), (4, 3), (8, 7)):  # groups smaller than the world too
        shards = [generation.EvalBatches(rows, r, world, 2, 0, generate_rows=n_gen) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # the same number of forward passes on every rank
        seen, answered = [], []
        for s in shards:
            for b in s:
                seen += [i for i in b["index"] if i >= 0]
                answered += [i for i in b["index"] if i >= 0 and b["generate"]]
        assert sorted(seen) == list(range(11)) and sorted(answered) == list(range(n_gen))


def _tiny_model(tok, arch="llama"):
    from transformers import AutoModelForCausalLM

    from launcher.tasks.causal_lm import tiny_config

    torch.manual_seed(0)
    cfg = load_config(SFT, [f"model.tiny.arch={arch}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
    model = AutoModelForCausalLM.from_config(tiny_config(cfg, len(tok), tok)).eval()
    model.config.use_cache = False  # as training leaves it
    return model


def test_a_causal_lm_folder_without_launcher_json_answers_as_one_and_generate_leaves_room_for_a_prompt(tok, tmp_path):
    """A causal LM saved by plain transformers (no launcher.json) was taken for a classifier:
    `generate` refused it as one and `predict` answered LABEL_0/LABEL_1 from a random head. Its
    config.json's architectures decide now (GPT2LMHeadModel too). And `generate` refuses a
    --max-new-tokens that leaves no room for a prompt in a learned position table, as predict
    does (it cut the prompt to one token and answered, exit 0)."""
    from launcher.models import position_limit

    for arch in ("llama", "gpt2"):
        folder = tmp_path / arch
        _tiny_model(tok, arch).save_pretrained(folder)
        tok.save_pretrained(folder)
        (tmp_path / "x.txt").write_text("is this clause fair?\n")
        said = check(launcher("generate", str(folder), "--prompt", "is this clause fair?", "--max-new-tokens", "3"))
        (row,) = [json.loads(x) for x in check(launcher("predict", str(folder), "--input", str(tmp_path / "x.txt"),
                                                          "--max-new-tokens", "3")).stdout.splitlines()]
        assert "label" not in row and "probs" not in row and row["response"] == said.stdout.strip(), (arch, row)
    # A prompt cut to fit is said (every row was answered, some from their prompt's end, silently)
    short = check(launcher("predict", str(folder), "--input", str(tmp_path / "x.txt"), "--max-new-tokens", "3"))
    cut = check(launcher("predict", str(folder), "--input", str(tmp_path / "x.txt"), "--max-new-tokens", "3", "--max-length", "3"))
    assert "note:" not in short.stderr
    piped = subprocess.run([sys.executable, "-m", "launcher", "predict", str(folder), "--input", "-", "--max-new-tokens", "3"],
                           input=(tmp_path / "x.txt").read_text(), capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})
    assert check(piped).stdout == short.stdout  # standard input's lines (--input -) as a file's
    rows = subprocess.run([sys.executable, "-m", "launcher", "predict", str(folder), "--input", "-"], input='{"instruction": "hi"}\n',
                          capture_output=True, text=True, env={**os.environ, **OFFLINE_ENV})  # (a prompt, braces and all)
    assert rows.returncode == 2 and rows.stderr.strip().splitlines()[-1] == (
        "error: --input: -: its lines are JSON rows, read only from a .jsonl file; give them as one"), rows.stderr[-2000:]
    # A classifier's rows given to a causal LM: one line for the file (it was one per row, the first 10 and a count)
    (tmp_path / "clauses.jsonl").write_text('{"text": "We may end it.", "label": 1}\n' * 12)
    for command in (["predict", str(folder), "--input"], ["eval", str(folder), "--data"]):
        proc = launcher(*command, str(tmp_path / "clauses.jsonl"))
        assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
            f"error: {'--input: ' if command[0] == 'predict' else ''}{tmp_path / 'clauses.jsonl'}: no instruction/output, "
            "messages, prompt/completion or conversations (ShareGPT) columns (its columns: text, label), which this "
            "causal LM answers"], proc.stderr
    # An empty prompt is nothing to answer (they were answered, exit 0): one line naming its row
    # (and a system turn alone, an instruction that is a number: both were misnamed)
    (tmp_path / "empty.jsonl").write_text('{"instruction": "hi"}\n{"instruction": "  "}\n'
                                          '{"messages": [{"role": "user", "content": ""}]}\n'
                                          '{"messages": [{"role": "system", "content": "Be brief."}]}\n{"instruction": 5}\n')
    proc = launcher("predict", str(folder), "--input", str(tmp_path / "empty.jsonl"))
    assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
        *(f"error: {tmp_path / 'empty.jsonl'}:{n}: an empty prompt: nothing to answer" for n in (2, 3)),
        f"error: {tmp_path / 'empty.jsonl'}:4: the conversation has no user turn: nothing to answer",
        f"error: {tmp_path / 'empty.jsonl'}:5: 'instruction' must be a string; got int"], proc.stderr
    (tmp_path / "rows.txt").write_text('{"instruction": "hi"}\n')  # so from a .txt file (a classifier refused it)
    rows = launcher("predict", str(folder), "--input", str(tmp_path / "rows.txt"))
    assert rows.returncode == 2 and rows.stderr.strip().splitlines()[-1] == (
        f"error: --input: {tmp_path / 'rows.txt'}: its lines are JSON rows, read only from a .jsonl file; rename it")
    assert "note: 1 of 1 prompts were longer than 3 tokens (--max-length): each was answered from its end" in cut.stderr.splitlines()
    limit = position_limit(_tiny_model(tok, "gpt2"))
    proc = launcher("generate", str(tmp_path / "gpt2"), "--prompt", "hi", "--max-new-tokens", str(limit))
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: --max-new-tokens: {limit} leaves no room for a prompt "
                                                             f"in the model's {limit} positions; give fewer than {limit}")


def test_answers_end_where_a_learned_position_table_does(tok):
    """GPT-2 reads no token past n_positions: with data.max_length = n_positions, prompts that
    fill the table made the evaluation's greedy answers (and `launcher eval`) index outside it.
    Each row's answer now ends where the table does: it is the answer of the same weights with a
    longer table, cut to the positions left after its prompt (plus the token the last one predicts)."""
    from transformers import AutoModelForCausalLM

    from launcher.models import position_limit
    from launcher.tasks.causal_lm import answer_prompts, continuation, prompt_rows

    wide = _tiny_model(tok, "gpt2")
    fmt = PromptFormat.from_config(DataConfig(), tok)
    clause = ROWS[0]["input"]
    records = [{**ROWS[0], "input": " ".join([clause] * k)} for k in (1, 3, 4)]
    enc = [encode(r, fmt, tok) for r in records]
    prompt_lens = [last_answer_start(y) for _, y in enc]
    limit = max(prompt_lens)  # the longest prompt fills the table: a one-token answer
    assert limit < position_limit(wide)
    config = wide.config.to_dict() | {"n_positions": limit}
    cut = AutoModelForCausalLM.from_config(type(wide.config).from_dict(config)).eval()
    state = wide.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:limit]
    cut.load_state_dict(state)
    assert position_limit(cut) == limit
    # Answers to the prompts alone: the rows are the prompts (no answer part), as predict's are.
    rows = [{"input_ids": x[:n], "labels": None, "answer": "", "question": ""} for (x, _), n in zip(enc, prompt_lens)]
    batch = generation.collate(rows, list(range(len(rows))), tok.eos_token_id, generate=True)
    max_new = 12
    reference = generation.run_batch(wide, batch, None, generation.stop_token_ids(tok, wide), max_new)
    answers = ["unfair", "other"]
    cands = generation.Candidates(answers, [continuation(a, fmt, tok) for a in answers])
    _, answered = generation.evaluate(cut, [batch], tok, cands, max_new)
    room = [limit - n + 1 for n in prompt_lens]
    assert any(len(r["response_ids"]) > k for r, k in zip(reference, room))  # the table does cut some answer
    for r, k, got in zip(reference, room, answered):
        assert got["response"] == tok.decode(r["response_ids"][:k], skip_special_tokens=True).strip()
    assert room[prompt_lens.index(limit)] == 1
    # `launcher generate` and eval.generation_prompts: a prompt longer than the table keeps the
    # end that leaves its answer room (4 tokens here), as predict's do.
    long = " ".join([clause] * 6)
    (row,) = prompt_rows([{"instruction": long, "input": "", "output": None, "_bare": True}], fmt, tok)
    assert len(row["input_ids"]) > limit
    end = generation.collate([{**row, "input_ids": row["input_ids"][-(limit - 4):]}], [0], tok.eos_token_id, generate=True)
    _, (own,) = generation.evaluate(cut, [end], tok, None, 4)
    assert answer_prompts(cut, tok, fmt, [long], 4) == [own["response"]]


@pytest.mark.parametrize("lean", [False, True], ids=["model-logits", "lean-head"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_pass_gives_the_models_own_loss_and_each_candidates_full_likelihood(arch, lean, tok):
    """The evaluation's single forward (prompts left-padded, answers after them, the head only on
    answer positions; multi-turn rows everywhere) against the model's own loss on right-padded
    rows; each candidate's score from the prompt cache against a plain forward of prompt + candidate.
    With the lean head (what training evaluations and `launcher eval` use), the forward keeps one
    position of logits and the head scores hidden states in chunks of 5 positions (chunks straddle
    rows): the same numbers."""
    from launcher.tasks import lean_loss
    from launcher.tasks.causal_lm import continuation

    model = _tiny_model(tok, arch)
    assert lean_loss.supported(model)
    head = lean_loss.Head(model, 5) if lean else None
    fmt = PromptFormat.from_config(DataConfig(), tok)
    records = [ROWS[0], {**ROWS[0], "input": "", "output": "other"}, {**ROWS[0], "instruction": "be brief"}, ROWS[1]]
    enc = [encode(r, fmt, tok) for r in records]
    answers = ["arbitration", "other", "unfair"]
    cands = generation.Candidates(answers, [continuation(a, fmt, tok) for a in answers])
    for group in (enc[:3], enc):  # single-answer rows, then with a two-turn conversation
        rows = [{"input_ids": x, "labels": y, "answer": "", "question": ""} for x, y in group]
        batch = generation.collate(rows, list(range(len(rows))), tok.eos_token_id, generate=True)
        results = generation.run_batch(model, batch, cands, {tok.eos_token_id}, 4, head=head)
        collate = instructions.LMCollator(tok.eos_token_id, packed=False)
        plain = collate([{"input_ids": x, "labels": y, "seq_lens": [len(x)]} for x, y in group])
        with torch.no_grad():
            own = model(**plain, num_items_in_batch=torch.tensor(1.0)).loss
        assert sum(r["loss"] for r in results) == pytest.approx(float(own), rel=1e-5)
        assert [r["tokens"] for r in results] == [sum(t != IGNORE for t in y[1:]) for _, y in group]
    # A cache that cannot be cut (or another rank that could not cut its own) is rebuilt from the
    # prompts: the same answers and scores.
    rebuilt = generation.run_batch(model, batch, cands, {tok.eos_token_id}, 4, sync=lambda _: True, head=head)
    for a, b in zip(results, rebuilt):
        assert a["response_ids"] == b["response_ids"] and a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    for (x, y), r in zip(enc, results):
        prompt = x[: last_answer_start(y)]
        for c, tokens in enumerate(cands.tokens):
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + tokens])).logits[0].float(), -1)
            want = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(tokens))
            assert r["scores"][c] == pytest.approx(want, abs=1e-4)
        assert r["choice"] == max(range(len(answers)), key=lambda c: r["scores"][c])


@pytest.mark.slow
def test_generation_metrics_pick_the_exported_checkpoint_and_predict_answers_rows(tmp_path):
    """eval.metric=choice_macro_f1 drives the export; `launcher eval` on the validation file gives
    the run's own final metrics; `launcher predict` answers rows that carry only the prompt's
    columns (mapped with data.prompt) and plain lines, with the likeliest candidate and its probs."""
    rows = []
    import random

    rng = random.Random(0)
    things = ["amber", "basil", "cedar", "delta", "ember", "fjord"]
    # "onyx " as a CSV column may have it: `launcher eval` stripped references but not the answer set.
    answer = {t: a for t, a in zip(things, ["maple", "raven", "onyx ", "maple", "quartz", "raven"])}
    for i in range(200):
        t = rng.choice(things)
        rows.append({"thing": t, "colour": answer[t], "id": i})
    train = _write(tmp_path / "train.jsonl", rows[:160])
    val = _write(tmp_path / "val.jsonl", rows[160:])
    out = tmp_path / "out"
    common = ["data.synthetic.enabled=false", f"data.train_file={train}", f"data.validation_file={val}",
              "data.prompt=What is the code word for {thing}?", "data.response={colour}", "eval.generation_prompts=[]",
              "train.epochs=12", "eval.every_steps=10", "checkpoint.every_steps=0", "eval.metric=choice_macro_f1"]
    proc = check(launcher("train", str(SFT), "--output-dir", str(out), "--run-name", "map", *common))
    run = out / "map"
    final = json.loads((run / "final_metrics.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(m["step"], m["eval/choice_macro_f1"]) for m in metrics if "eval/choice_macro_f1" in m]
    best_step, best = max(evals, key=lambda sv: (sv[1], -sv[0]))
    assert final["exported_step"] == best_step and final["after"]["choice_macro_f1"] == pytest.approx(best)
    assert final["after"]["choice_macro_f1"] > 0.9 and final["before"]["choice_macro_f1"] < 0.7
    assert "choice_macro_f1" in proc.stdout.split("step 0 eval:")[1].splitlines()[0]
    meta = json.loads((run / "model" / "launcher.json").read_text())
    assert meta["answers"] == ["maple", "onyx ", "quartz", "raven"] and meta["prompt"]["prompt"].endswith("{thing}?")
    assert meta["truncation"] == "truncate"  # what `launcher eval` does to a row past max_length, as the run did
    samples = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"] == "What is the code word for " + rows[160]["thing"] + "?"  # from the validation rows
    scored = check(launcher("eval", str(run / "model"), "--data", str(val)))
    ev = json.loads(scored.stdout.strip().splitlines()[-1])
    for key in ("loss", "exact_match", "choice_accuracy", "choice_macro_f1", "n"):
        assert ev[key] == pytest.approx(final["after"][key], rel=1e-4), key
    # References the answer set lacks (scored against every choice without a word) are counted,
    # and so are empty ones (only an empty reply matches them).
    assert "none of the model's" not in scored.stderr and "empty" not in scored.stderr
    odd = _write(tmp_path / "odd.jsonl", [{**r, "colour": "teal"} for r in rows[160:163]]
                 + [{**r, "colour": " "} for r in rows[163:165]] + rows[165:170])
    said = check(launcher("eval", str(run / "model"), "--data", str(odd))).stderr.splitlines()
    assert "note: 3 of 10 references are none of the model's 4 answers ('teal' first): no choice can match them, and each " \
           "counts against choice_accuracy" in said, said  # (the empty ones are counted apart)
    assert "note: 2 of 10 references are empty: exact match counts only an empty reply right for them" in said, said
    queries = _write(tmp_path / "queries.jsonl", [{"thing": t} for t in things])  # no answer column at all
    pred_out = tmp_path / "pred.jsonl"
    check(launcher("predict", str(run / "model"), "--input", str(queries), "--output", str(pred_out)))
    pred = [json.loads(x) for x in pred_out.read_text().splitlines()]
    assert [p["thing"] for p in pred] == things
    assert sum(p["label"] == answer[p["thing"]] for p in pred) >= 5
    assert all(set(p["probs"]) == set(meta["answers"]) and sum(p["probs"].values()) == pytest.approx(1, abs=1e-4)
               and p["label"] == max(p["probs"], key=p["probs"].get) for p in pred)
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(things) + "\n")  # plain lines fill the prompt's one column
    plain = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(lines))).stdout.splitlines()
             if x.startswith("{")]
    assert [p["label"] for p in plain] == [p["label"] for p in pred] and [p["response"] for p in plain] == [p["response"] for p in pred]
    # A Windows editor's file (byte-order mark, CRLF) reads the same; one not in UTF-8 is one line,
    # not a UnicodeDecodeError traceback; the mark was the first prompt's first character.
    lines.write_bytes(("\ufeff" + "\r\n".join(things) + "\r\n").encode("utf-8"))
    windows = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(lines))).stdout.splitlines()
               if x.startswith("{")]
    assert windows == plain
    lines.write_bytes("caf\xe9\n".encode("latin-1"))
    proc = launcher("predict", str(run / "model"), "--input", str(lines))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
        f"error: --input: {lines}: not UTF-8 text (byte 4); give JSONL, CSV or Parquet rows, or one prompt per line"]
    # An empty input was an empty output and exit 0: a wrong file looked answered.
    for empty, text in (("empty.jsonl", ""), ("empty.txt", "\n  \n")):
        (tmp_path / empty).write_text(text)
        proc = launcher("predict", str(run / "model"), "--input", str(tmp_path / empty))
        assert proc.returncode == 2 and [x for x in proc.stderr.splitlines() if x.startswith("error:")] == [
            f"error: --input: {tmp_path / empty}: no rows"], proc.stderr[-2000:]


def test_predict_stops_its_answers_where_the_runs_evaluation_did(tmp_path):
    """The run's answers stop 8 tokens past the longest reference (eval.max_new_tokens caps
    them); predict went on to eval.max_new_tokens, so a barely trained model's answers to the
    same validation rows were longer than the run's own."""
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "x", "train.max_steps=2",
                   "train.lr=1e-5", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=0",
                   "eval.max_new_tokens=32", "eval.generation_prompts=[]", "tracking.mlflow=false"))
    run = tmp_path / "x"
    meta = json.loads((run / "model" / "launcher.json").read_text())
    assert meta["max_new_tokens"] == 32 and meta["answer_max_new_tokens"] < 32
    own = [json.loads(x) for x in (run / "predictions" / "step-000002.jsonl").read_text().splitlines()]
    out = tmp_path / "p.jsonl"
    check(launcher("predict", str(run / "model"), "--input", str(run / "data" / "validation.jsonl"), "--output", str(out)))
    pred = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(pred) == len(own) > 0
    assert [p["response"] for p in pred] == [o["response"] for o in own]
    longer = [json.loads(x) for x in check(launcher("predict", str(run / "model"), "--input", str(run / "data" / "validation.jsonl"),
                                                    "--max-new-tokens", "32")).stdout.splitlines() if x.startswith("{")]
    assert all(p["response"].startswith(o["response"]) for p, o in zip(longer, own))
    assert any(len(p["response"]) > len(o["response"]) for p, o in zip(longer, own))  # --max-new-tokens lets them run


_RANK_1_WRITES = """
import os, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
from launcher import models

torch.distributed.init_process_group("gloo")
out = Path(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
if torch.distributed.get_rank() == 1:
    model.save_pretrained(out / "save_pretrained", is_main_process=True)
    models.write_weights(model, out / "written")
    torch.save(model.state_dict(), out / "weights.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def test_a_gguf_conversion_is_written_by_whichever_rank_builds_it(tmp_path):
    """The conversion is built by the first node's rank to take the cache lock, not always rank 0.
    Pinned stack fact: with torch.distributed up, transformers' save_pretrained writes nothing on
    a rank other than 0, even with is_main_process=True (a multi-node run once loaded an empty
    entry). models.write_weights writes on any rank, tied weights once, and reloads to the same weights."""
    import os
    import subprocess
    import sys

    from test_distributed import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_1_WRITES, str(tmp_path)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    assert not (tmp_path / "save_pretrained" / "config.json").exists()  # the stack fact (transformers 5.24)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    written = tmp_path / "written"
    assert sorted(p.name for p in written.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert "lm_head.weight" not in load_file(written / "model.safetensors")  # tied: stored once
    reloaded = AutoModelForCausalLM.from_pretrained(written)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    want = torch.load(tmp_path / "weights.pt")
    got = reloaded.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_launcher_eval_renders_validation_with_the_system_prompt_training_rows_share(tmp_path):
    """Every training conversation opens with the same system turn, so the export records it
    and `launcher eval`/`generate`/`predict` put it before rows without one. The run scored
    its validation rows (none has one) without it: `launcher eval` of the export gave another
    loss than the run's own final evaluation. Validation is now rendered as the export is."""
    from launcher.data.instructions import generate_instructions

    def chat(row: dict, system: str | None = None) -> str:
        if "messages" in row:  # (the generator writes some rows as conversations)
            turns = [t for t in row["messages"] if t["role"] != "system"]
        else:
            turns = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        return json.dumps({"messages": ([{"role": "system", "content": system}] if system else []) + turns}) + "\n"

    (tmp_path / "train.jsonl").write_text("".join(chat(r, "Be brief.") for r in generate_instructions(256, 0)))
    (tmp_path / "val.jsonl").write_text("".join(chat(r) for r in generate_instructions(32, 1)))
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "s", "data.synthetic.enabled=false",
                   f"data.train_file={tmp_path / 'train.jsonl'}", f"data.validation_file={tmp_path / 'val.jsonl'}",
                   "train.max_steps=8", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=8",
                   "eval.generation_prompts=[]", "tracking.mlflow=false"))
    run = tmp_path / "s"
    assert json.loads((run / "model" / "launcher.json").read_text())["prompt"]["system_prompt"] == "Be brief."
    after = json.loads((run / "final_metrics.json").read_text())["after"]
    fresh = json.loads(check(launcher("eval", str(run / "model"), "--data", str(tmp_path / "val.jsonl"))).stdout)
    assert fresh["n"] == after["n"] == 32
    assert fresh["loss"] == pytest.approx(after["loss"], rel=1e-5)
    # Plain transformers asks the export as launcher does: its tokenizer got a chat template
    # that renders conversations as data.chat_turn_template did, the shared system prompt first.
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(run / "model")
    fmt = PromptFormat.from_json(json.loads((run / "model" / "launcher.json").read_text()))
    assert not fmt.chat_template and fmt.style == "chat"
    for line in (tmp_path / "val.jsonl").read_text().splitlines()[:4]:
        question = json.loads(line)["messages"][:1]
        ids = plain.apply_chat_template(question, add_generation_prompt=True)["input_ids"]
        assert ids == prompts.prompt_ids({"messages": question}, fmt, plain)
        assert "Be brief." in plain.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    check(launcher("export", str(run / "checkpoints" / "step-000008"), str(tmp_path / "again")))
    assert AutoTokenizer.from_pretrained(tmp_path / "again").chat_template == plain.chat_template
    # A run started from that checkpoint reads its tiny tokenizer from the checkpoint, template
    # and all: it renders with the turn template as its parent did (the template, the closing
    # text after each EOS learned too), and its export gets the template again.
    forked = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "f", "data.synthetic.enabled=false",
                            f"data.train_file={tmp_path / 'train.jsonl'}", f"data.validation_file={tmp_path / 'val.jsonl'}",
                            "train.max_steps=10", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=0",
                            "eval.generation_prompts=[]", "tracking.mlflow=false",
                            f"checkpoint.resume={run / 'checkpoints' / 'step-000008'}"))
    assert "resuming from" in forked.stdout
    again = json.loads((tmp_path / "f" / "model" / "launcher.json").read_text())["prompt"]
    assert again == json.loads((run / "model" / "launcher.json").read_text())["prompt"] and not again["chat_template"]
    assert AutoTokenizer.from_pretrained(tmp_path / "f" / "model").chat_template == plain.chat_template


def test_launcher_eval_cuts_or_drops_a_long_row_as_the_run_did(tok):
    """`launcher eval` always cut a row longer than max_length, also for a run that dropped such
    rows (data.truncation=drop): the same file scored other rows offline than in the run. The
    export records what the run did, and eval does the same."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from launcher.tasks import causal_lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    fmt = PromptFormat.from_config(DataConfig(), tok)
    short = {"instruction": "hello there", "input": "", "output": "general kenobi"}
    long = {"instruction": "hello there", "input": "", "output": " ".join(["general kenobi"] * 20)}
    max_length = len(encode(short, DataConfig(), tok)[0]) + 4  # the long row's answer is cut, not lost
    n = {how: causal_lm.evaluate_rows(model, tok, fmt, [short, long], max_length, None, 4, truncation=how)["n"]
         for how in ("truncate", "drop")}
    assert n == {"truncate": 2, "drop": 1}
    with pytest.raises(DataError, match=r"^--data: no row left to evaluate: all 1 dropped"):  # not a loss of 0
        causal_lm.evaluate_rows(model, tok, fmt, [long], max_length, None, 4, truncation="drop")


@pytest.mark.parametrize("config", ["sft_tiny.yaml", "clause_tiny.yaml"])
def test_eval_under_the_runs_precision_gives_the_runs_figures(tmp_path, config):
    """A train.precision=bf16 run evaluates under bf16 autocast, `launcher eval` in float32, and
    the two can be far apart (SmolLM2 after two LoRA steps: 2.36 in the run, 1.73 from eval).
    --precision bf16 evaluates as the run did, to its exact figures; the float32 default says
    where the run's came from."""
    from conftest import CONFIGS as C

    check(launcher("train", str(C / "train" / config), "--output-dir", str(tmp_path), "--run-name", "b", "train.precision=bf16",
                   "train.max_steps=20", "eval.every_steps=0", "checkpoint.every_steps=20"))
    run = tmp_path / "b"
    final = json.loads((run / "final_metrics.json").read_text())["after"]
    data = str(run / "data" / "validation.jsonl")

    def evaluate(*flags):
        proc = check(launcher("eval", str(run / "model"), "--data", data, *flags))
        return json.loads(proc.stdout.strip().splitlines()[-1]), [x for x in proc.stderr.splitlines() if x.startswith("note:")]

    same, notes = evaluate("--precision", "bf16")
    # The causal LM's evaluation batches are the run's: its loss to the last bit. The classifier's
    # are padded to other lengths (its batch size), which bf16 products round differently.
    exact = config.startswith("sft")
    assert same["loss"] == pytest.approx(final["loss"], rel=1e-9 if exact else 1e-4, abs=1e-12) and notes == []
    assert same["macro_f1"] == final["macro_f1"]
    plain, notes = evaluate()
    assert abs(plain["loss"] - final["loss"]) > abs(same["loss"] - final["loss"]), (plain["loss"], same["loss"], final["loss"])
    assert notes == ["note: the run evaluated this model under bf16 autocast; these figures are from float32 weights "
                     "without autocast (--precision bf16 evaluates as it did)"]
