"""Causal-LM instruction fine-tuning: masking, truncation, packing, pad policy, and tiny runs that learn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from launcher.config import DataConfig, load_config
from launcher.data import instructions, prompts
from launcher.data.instructions import IGNORE, LMCollator, encode, encode_rows, pack
from launcher.data.tokenizer import train_lm_tokenizer
from launcher.errors import DataError

from conftest import CONFIGS, all_runs, check, launcher, mlflow_client, task_tokenizer

SFT = CONFIGS / "train" / "sft_tiny.yaml"


@pytest.fixture(scope="module")
def tok():
    texts = ["### instruction : ### input : ### response : < | system | > < | user | > < | assistant | >",
             "what is the code word for amber zephyr ? maple yarrow be brief hello there general kenobi"]
    return train_lm_tokenizer(texts, 200, 64)


@pytest.fixture(scope="module")
def data_tok():
    """A tokenizer built from the synthetic rows, as a tiny run builds it."""
    class Plain:
        eos_token, chat_template = "", None

    rows = instructions.generate_instructions(200, 0)
    return train_lm_tokenizer([instructions.render(r, DataConfig(), Plain)[0] for r in rows], 400, 64)


def read_problems(path: Path) -> list[str]:
    """The lines a file of instruction rows is refused with."""
    with pytest.raises(DataError) as e:
        instructions.read_rows(path)
    return e.value.problems


def response_text(tok, ids, labels) -> str:
    return tok.decode([t for t, y in zip(ids, labels) if y != IGNORE])


def test_tokenizing_rows_and_prompts_leaves_the_tokenizer_as_it_was_loaded():
    """A tokenizer file may carry truncation and padding (MiniLM's does); a fast tokenizer called
    without them clears them on its backend and keeps them cleared, so the run's export saved a
    tokenizer.json without them. Every call launcher makes puts the backend back."""
    from launcher.data import prompts as P
    from launcher.tasks.causal_lm import answer_frame

    texts = ["### instruction : what is the code word ? ### response : maple"]
    fresh = train_lm_tokenizer(texts, 200, 64)
    backend = fresh.backend_tokenizer
    backend.enable_truncation(max_length=48)
    backend.enable_padding(pad_id=0, pad_token="<unk>", length=48)
    loaded = (backend.truncation, backend.padding)
    fmt = P.PromptFormat.from_config(DataConfig(), fresh)
    row = {"instruction": "what is the code word", "input": "", "output": "maple"}
    instructions.encode(row, fmt, fresh)
    P.prompt_ids({"instruction": "what is the code word"}, fmt, fresh)
    P.cuts_cleanly.cache_clear()
    P.cuts_cleanly(fresh)
    answer_frame(fmt, fresh)
    assert (backend.truncation, backend.padding) == loaded


def test_instruction_row_trains_on_the_response_and_eos_only(tok):
    cfg = DataConfig()
    ids, labels = encode({"instruction": "What is the code word for amber zephyr?", "input": "", "output": "maple yarrow"}, cfg, tok)
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE
    kept = [(t, y) for t, y in zip(ids, labels) if y != IGNORE]
    assert all(t == y for t, y in kept)  # a label is the token itself (the model shifts)
    assert [t for t, _ in kept] == tok("maple yarrow", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # Everything before the response is prompt: masked, and it decodes to the template.
    first = next(i for i, y in enumerate(labels) if y != IGNORE)
    assert tok.decode(ids[1:first]).startswith("# # # instruction")
    assert set(labels[:first]) == {IGNORE}


def test_chat_rows_train_on_every_assistant_turn_only(tok):
    cfg = DataConfig()
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                        {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "what is the code word for amber zephyr?"},
                        {"role": "assistant", "content": "maple yarrow"}]}
    ids, labels = encode(row, cfg, tok)
    assert response_text(tok, ids, labels) == "general kenobi </s> maple yarrow </s>"
    eos_labels = [i for i, (t, y) in enumerate(zip(ids, labels)) if t == tok.eos_token_id and y != IGNORE]
    assert len(eos_labels) == 2  # each assistant turn ends with a learned EOS
    masked = tok.decode([t for t, y in zip(ids, labels) if y == IGNORE])
    assert "be brief" in masked and "hello there" in masked and "kenobi" not in masked


def test_openai_chat_rows_read_as_that_api_writes_them(tok, tmp_path):
    """OpenAI's chat fine-tuning rows: an assistant turn of `weight: 0` is context, untrained (the
    weight was dropped, and the turns a user had excluded were learned), and a row is scored on
    the last answer it trains; `developer` is the system turn; content may be a list of text
    parts. What cannot be read (a tool turn, a tool call's null content, an image part, a weight
    of 0.5, every answer of weight 0) is its row's one line."""
    U, A = ({"role": "user", "content": "hello there"}, {"role": "user", "content": "what is the code word?"})
    wrong, right = {"role": "assistant", "content": "general kenobi"}, {"role": "assistant", "content": "maple yarrow"}
    kept: list = []
    ids, labels, _ = encode_rows([{"messages": [U, {**wrong, "weight": 0}, A, {**right, "weight": 1}]},
                                  {"messages": [U, wrong, A, {**right, "weight": 0}]}], DataConfig(), tok, kept=kept)
    assert [response_text(tok, i, y) for i, y in zip(ids, labels)] == ["maple yarrow </s>", "general kenobi </s>"]
    assert [prompts.answer(r) for r in kept] == ["maple yarrow", "general kenobi"]
    # kept as context before a trained answer; after the last one it trains nothing and is left out
    assert "general kenobi" in tok.decode(ids[0]) and "maple yarrow" not in tok.decode(ids[1])
    parts = {"messages": [{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
                          wrong]}
    fmt = instructions.as_format(DataConfig(), tok)
    assert prompts.normalize(parts, fmt, "x") == {"messages": [{"role": "system", "content": "be brief"}, U, wrong]}
    # predict answers after the last turn whatever its weight (it asked before the last trained answer)
    weighted = [U, wrong, A, {**right, "weight": 0}]
    asked = [prompts.prompt_text(prompts.normalize({"messages": m}, fmt, "x", need_answer=False), fmt, tok)
             for m in (weighted, [U, wrong, A, right])]
    assert asked[0] == asked[1]
    # A template that marks the last turn (as Qwen3 gives only it a <think> block) renders an
    # earlier answer otherwise once turns follow: with a weight-0 answer last, the trained one had
    # no span and the row was counted as a greeting with nothing to learn.
    marks = train_lm_tokenizer(["[ user ] [ bot ] hello there general kenobi what is the code word ? maple yarrow "
                                "think"], 200, 64)
    marks.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}[bot] {% if loop.last %}think "
                           "{% endif %}{{ m.content }}{{ eos_token }}{% else %}[{{ m.role }}] {{ m.content }} {% endif %}"
                           "{% endfor %}{% if add_generation_prompt %}[bot] {% endif %}")
    ids, labels, stats = encode_rows([{"messages": weighted}], DataConfig(), marks)
    assert response_text(marks, ids[0], labels[0]) == "think general kenobi </s>" and stats.unanswered == 0
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (
        [U, {"role": "tool", "content": "42"}, right], [U, {"role": "assistant", "content": None, "tool_calls": []}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, right],
        [U, {**right, "weight": 0.5}], [U, {**right, "weight": 0}], [{**U, "weight": 0}, right])))
    assert read_problems(path) == [
        f"{path}:1: messages[1] needs role (system, user or assistant) and string content; got 'tool'",
        f"{path}:2: messages[1] needs role (system, user or assistant) and string content; got null (a tool call?)",
        f"{path}:3: messages[0] has a content part of type 'image_url': only text parts are read",
        f"{path}:4: messages[1] has weight 0.5: a turn's weight is 0 or 1",
        f"{path}:5: 'messages' has no assistant turn to learn from (each has weight 0)"]


def test_dolly_rows_read_as_alpaca_rows(tok, tmp_path):
    """databricks-dolly-15k's rows (instruction, context, response, category) failed on every row
    as "missing string 'output'": context and response are read as input and output (an
    Alpaca file's own output and input come first)."""
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"instruction": "Name a colour.", "context": "", "response": "Red.", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
        {"instruction": "Both?", "input": "x", "output": "the output", "response": "not this"},
        {"instruction": "Mixed.", "input": None, "output": None, "context": "Its text.", "response": "Its answer."})))
    assert instructions.read_rows(path) == [
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Summarise.", "input": "A long text.", "output": "Short."},
        {"instruction": "Both?", "input": "x", "output": "the output"},
        {"instruction": "Mixed.", "input": "Its text.", "output": "Its answer."}]  # (a file of both shapes)
    path.write_text("".join(json.dumps(r) + "\n" for r in (
        {"instruction": "i", "context": 3, "response": "r"}, {"instruction": "i", "response": None},
        {"instruction": "i", "input": "x", "context": "y", "output": "o"},
        {"instruction": "i", "input": 0, "output": "o"}, {"instruction": "i", "input": [], "context": "y", "output": "o"})))
    assert read_problems(path) == [f"{path}:1: 'context' must be a string",
                                f"{path}:2: missing string 'output' (or give 'messages')",
                                f"{path}:3: both 'input' and 'context' (Dolly's input): give one",
                                f"{path}:4: 'input' must be a string",  # (0 and [] read as no input)
                                f"{path}:5: both 'input' and 'context' (Dolly's input): give one"]


def test_the_tokenizers_own_chat_template_is_used_when_it_has_one(tok):
    tok2 = train_lm_tokenizer(["[ user ] [ bot ] hello there general kenobi"], 200, 64)
    tok2.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}[bot] {{ m.content }}{{ eos_token }}"
                          "{% else %}[{{ m.role }}] {{ m.content }} {% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}[bot] {% endif %}")
    row = {"messages": [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}]}
    ids, labels = encode(row, DataConfig(), tok2)
    assert response_text(tok2, ids, labels) == "general kenobi </s>"
    assert "[ bot ]" in tok2.decode(ids)  # rendered by the tokenizer's template, not ours


def test_rows_with_no_answer_to_learn_are_counted_apart_from_truncation():
    """Under a chat template an assistant turn before any user turn (a greeting) is context: a
    row with no other answer trains nothing. Such rows were counted as dropped by
    data.truncation, with a note blaming the template's re-rendering (Qwen3's <think> blocks),
    and a file of them failed as "dropped (data.max_length ...)"."""
    import datasets

    tok2 = train_lm_tokenizer(["[ user ] [ bot ] hello there general kenobi welcome"], 200, 64)
    tok2.chat_template = ("{% for m in messages %}{% if m.role == 'assistant' %}[bot] {{ m.content }}{{ eos_token }}"
                          "{% else %}[{{ m.role }}] {{ m.content }} {% endif %}{% endfor %}"
                          "{% if add_generation_prompt %}[bot] {% endif %}")
    U, A = {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "general kenobi"}
    greeting = {"role": "assistant", "content": "welcome"}
    encoder = instructions.InstructionEncoder(DataConfig(max_length=64), tok2)
    rows = [[greeting, U], [{"role": "system", "content": "be brief"}, greeting], [U, A], [greeting, U, A]]
    _, counted = encoder.finish(datasets.Dataset.from_dict(encoder({"messages": [json.dumps(r) for r in rows]})))
    stats = instructions.EncodeStats(**counted)
    assert (stats.rows, stats.dropped, stats.unanswered, stats.untrained_turns, stats.examples()) == (4, 2, 2, 0, 2)
    assert stats.line("train").startswith(
        "train: 4 rows, 0 truncated, 0 dropped (data.truncation), 2 with no answer to learn (each assistant turn comes "
        "before any user turn: a greeting answers nothing), ")
    with pytest.raises(DataError) as e:
        encoder.finish(datasets.Dataset.from_dict(encoder({"messages": [json.dumps(r) for r in rows[:2]]})))
    assert e.value.problems == ["no usable rows: all 2 were dropped: 2 with no answer to learn (each assistant turn "
                                "comes before any user turn: a greeting answers nothing)"]


def test_truncation_policy_is_counted(tok):
    long = {"instruction": "hello there " * 40, "input": "", "output": "maple yarrow"}
    short = {"instruction": "be brief", "input": "", "output": "general kenobi"}
    cut = DataConfig(max_length=32, truncation="truncate")
    ids, labels, stats = encode_rows([long, short, short], cut, tok)
    # The long row loses its response to truncation: nothing left to learn, so it is dropped
    # (and counted once: "3 rows, 1 truncated, 1 dropped" read as a third row cut and kept).
    assert (stats.rows, stats.truncated, stats.dropped, len(ids)) == (3, 0, 1, 2)
    # Training's reader (a datasets map, then finish) counts alike.
    import datasets

    encoder = instructions.InstructionEncoder(cut, tok)
    out = encoder({"instruction": [r["instruction"] for r in (long, short, short)], "input": [""] * 3,
                   "output": [r["output"] for r in (long, short, short)]})
    _, counted = encoder.finish(datasets.Dataset.from_dict(out))
    assert (counted["rows"], counted["truncated"], counted["dropped"]) == (3, 0, 1)
    ids, labels, stats = encode_rows([long, short], DataConfig(max_length=32, truncation="drop"), tok)
    assert (stats.truncated, stats.dropped, len(ids)) == (0, 1, 1)
    full = len(encode(short, cut, tok)[0])  # cutting only the final EOS keeps the row, truncated
    ids, labels, stats = encode_rows([short], DataConfig(max_length=full - 1), tok)
    assert (stats.truncated, stats.dropped, len(ids[0])) == (1, 0, full - 1) and labels[0][-1] != tok.eos_token_id
    # A conversation whose answers fit but whose closing user turn does not: that turn trains
    # nothing, so it is left out and the row fits, under either policy (it was dropped, or
    # counted as truncated).
    convo = {"messages": [{"role": "user", "content": "be brief"}, {"role": "assistant", "content": "general kenobi"},
                          {"role": "user", "content": "hello there " * 20}]}
    answered = len(encode({"messages": convo["messages"][:2]}, cut, tok)[0])
    whole, whole_labels = encode(convo, cut, tok)
    assert len(whole) > 32 >= answered
    for policy in ("drop", "truncate"):
        ids, labels, stats = encode_rows([convo], DataConfig(max_length=32, truncation=policy), tok)
        last = max(i for i, y in enumerate(whole_labels) if y != IGNORE)
        assert (stats.truncated, stats.dropped) == (0, 0) and ids[0] == whole[: last + 1], policy


def test_malformed_rows_are_reported_as_file_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"instruction": "ok", "output": "fine"}),
        json.dumps({"instruction": "no output"}),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}),
    ]) + "\n")
    assert read_problems(path) == [
        f"{path}:2: missing string 'output' (or give 'messages')",
        f"{path}:3: not valid JSON (Expecting property name enclosed in double quotes)",
        f"{path}:4: 'messages' has no assistant turn to learn from",
        f"{path}:5: messages[0] needs role (system, user or assistant) and string content; got 'wizard'",
    ]


def test_packing_keeps_every_token_in_order_and_fills_blocks(data_tok):
    rows = instructions.generate_instructions(40, 0)
    ids, labels, _ = encode_rows(rows, DataConfig(max_length=64), data_tok)
    p_ids, p_labels, p_lens = pack(ids, labels, 64)
    assert sum(p_ids, []) == sum(ids, []) and sum(p_labels, []) == sum(labels, [])
    assert all(len(b) <= 64 for b in p_ids) and [sum(x) for x in p_lens] == [len(b) for b in p_ids]
    assert len(p_ids) <= len(ids) / 2  # ~23-token rows: two share each 64-token block


def _tiny_lm(arch: str, attn: str, vocab: int, tok):
    from transformers import AutoModelForCausalLM, MistralConfig

    from launcher.tasks.causal_lm import tiny_config

    torch.manual_seed(0)
    if arch == "mistral":  # a sliding window shorter than the examples, so it matters
        config = MistralConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, sliding_window=5,
                               max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        cfg = load_config(SFT, [f"model.tiny.arch={arch}", "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64"])
        config = tiny_config(cfg, vocab, tok)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.config.use_cache = False  # as training sets it (tasks/modeling.py)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_packed_examples_do_not_attend_to_each_other(arch, attn, data_tok):
    """Logits and loss of packed rows (two rows of different length, so one ends in padding)
    equal those of their examples run one by one, with a sliding-window model too; the
    collator passes position ids only, nothing of size L x L."""
    model = _tiny_lm(arch, attn, len(data_tok), data_tok)
    ids, labels, _ = encode_rows(instructions.generate_instructions(12, 1), DataConfig(max_length=64), data_tok)
    p_ids, p_labels, p_lens = pack(ids, labels, 64)
    k = len(p_lens[0])
    assert k >= 2
    # A second row holding one example: shorter, so the batch pads it at the end.
    p_ids[1], p_labels[1], p_lens[1] = ids[k], labels[k], [len(ids[k])]
    rows = [{"input_ids": p_ids[r], "labels": p_labels[r], "seq_lens": p_lens[r]} for r in (0, 1)]
    packed = LMCollator(data_tok.eos_token_id, packed=True)(rows)
    width = packed["input_ids"].shape[1]
    assert set(packed) == {"input_ids", "labels", "position_ids"}
    assert all(width not in tuple(v.shape)[2:] and v.dim() == 2 for v in packed.values())
    n = len(p_lens[0]) + len(p_lens[1])
    single = LMCollator(data_tok.eos_token_id, packed=False)([{"input_ids": x, "labels": y, "seq_lens": [len(x)]} for x, y in zip(ids[:n], labels[:n])])
    with torch.no_grad():
        out_packed = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
        out_single = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits
    i = 0
    for r in (0, 1):
        start = 0
        for length in p_lens[r]:
            assert torch.allclose(out_packed[r, start : start + length], out_single[i, :length], atol=1e-5), (r, i)
            start += length
            i += 1
    with torch.no_grad():  # and so the loss, averaged over the same response tokens
        packed_loss = model(**packed).loss
        per_token = [torch.nn.functional.cross_entropy(out_single[i, : len(x) - 1], torch.tensor(y[1:]), ignore_index=IGNORE, reduction="sum")
                     for i, (x, y) in enumerate(zip(ids[:n], labels[:n]))]
        count = sum(sum(t != IGNORE for t in y[1:]) for y in labels[:n])
    assert float(packed_loss) == pytest.approx(float(sum(per_token) / count), rel=1e-5)


def _packed_rows(data_tok):
    """Two packed rows of different length (the second holds one example) and the examples."""
    ids, labels, _ = encode_rows(instructions.generate_instructions(12, 1), DataConfig(max_length=64), data_tok)
    p_ids, p_labels, p_lens = pack(ids, labels, 64)
    k = len(p_lens[0])
    p_ids[1], p_labels[1], p_lens[1] = ids[k], labels[k], [len(ids[k])]
    rows = [{"input_ids": p_ids[r], "labels": p_labels[r], "seq_lens": p_lens[r]} for r in (0, 1)]
    return rows, ids[: k + 1], labels[: k + 1]


def test_flattened_micro_batch_equals_its_examples_and_carries_the_varlen_boundaries(data_tok):
    """Under flash attention a micro-batch of packed rows becomes one padding-free row: its
    per-example logits and its loss equal the examples run one by one (sdpa finds the
    boundaries from the position ids of a one-row batch), it predicts the same response
    tokens as the unflattened rows, and its cu_seq_lens/max_length are what transformers
    itself derives from those position ids for the flash varlen kernel (int32 offsets)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    model = _tiny_lm("llama", "sdpa", len(data_tok), data_tok)
    rows, ids, labels = _packed_rows(data_tok)
    flat = LMCollator(data_tok.eos_token_id, packed=True, flatten=True)(rows)
    packed = LMCollator(data_tok.eos_token_id, packed=True)(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert flat["input_ids"].shape == (1, total) and packed["input_ids"].shape[0] == 2  # no padding left
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert flat["cu_seq_lens_q"].dtype == torch.int32 and flat["cu_seq_lens_q"].tolist() == cu_q.tolist() == cu_k.tolist()
    assert flat["cu_seq_lens_q"].tolist()[-1] == total and len(flat["cu_seq_lens_q"]) == len(ids) + 1
    assert flat["max_length_q"] == flat["max_length_k"] == int(max_q) == int(max_k) == max(len(x) for x in ids)
    assert int((flat["labels"][:, 1:] != IGNORE).sum()) == int((packed["labels"][:, 1:] != IGNORE).sum())
    single = LMCollator(data_tok.eos_token_id, packed=False)([{"input_ids": x, "labels": y, "seq_lens": [len(x)]} for x, y in zip(ids, labels)])
    with torch.no_grad():  # the varlen arguments ride along as the trainer passes them; sdpa ignores them
        out_flat = model(**{k: v for k, v in flat.items() if k != "labels"}).logits[0]
        out_single = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits
        flat_loss = model(**flat).loss
    start = 0
    for i, x in enumerate(ids):
        assert torch.allclose(out_flat[start : start + len(x)], out_single[i, : len(x)], atol=1e-5), i
        start += len(x)
    per_token = [torch.nn.functional.cross_entropy(out_single[i, : len(x) - 1], torch.tensor(y[1:]), ignore_index=IGNORE, reduction="sum")
                 for i, (x, y) in enumerate(zip(ids, labels))]
    count = sum(sum(t != IGNORE for t in y[1:]) for y in labels)
    assert float(flat_loss) == pytest.approx(float(sum(per_token) / count), rel=1e-5)


def test_an_examples_first_token_is_never_a_target_in_packed_rows(data_tok):
    """A response that starts its example (no prompt tokens) is not predicted from the example
    packed before it, as it is not in a row of its own: the packed loss equals the per-example
    sum, flattened or not."""
    model = _tiny_lm("llama", "sdpa", len(data_tok), data_tok)
    rows, ids, labels = _packed_rows(data_tok)
    labels = [list(x) for x in labels]
    labels[1][0] = ids[1][0]  # the second example of the first packed row: its first token labelled
    rows[0]["labels"] = [t for y in labels[: len(rows[0]["seq_lens"])] for t in y]
    single = LMCollator(data_tok.eos_token_id, packed=False)([{"input_ids": x, "labels": y, "seq_lens": [len(x)]} for x, y in zip(ids, labels)])
    with torch.no_grad():
        out_single = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).logits
        want = sum(torch.nn.functional.cross_entropy(out_single[i, : len(x) - 1], torch.tensor(y[1:]), ignore_index=IGNORE, reduction="sum")
                   for i, (x, y) in enumerate(zip(ids, labels)))
        count = sum(sum(t != IGNORE for t in y[1:]) for y in labels)
        for flatten in (False, True):
            batch = LMCollator(data_tok.eos_token_id, packed=True, flatten=flatten)(rows)
            assert int((batch["labels"][:, 1:] != IGNORE).sum()) == count
            assert float(model(**batch).loss) == pytest.approx(float(want / count), rel=1e-5), flatten


def test_auto_attention_picks_flash_only_for_16_bit_runs_and_flattens_packed_batches(monkeypatch):
    """On a host where flash attention could run (CUDA and flash-attn, pretended here), auto
    takes it for bf16/fp16 runs only: its kernels cannot run fp32. The causal-LM task's
    collator then flattens packed micro-batches; under sdpa it does not."""
    import importlib.util

    from transformers import BloomForCausalLM, DebertaV2ForSequenceClassification, T5ForSequenceClassification

    from launcher import tasks
    from launcher.tasks import modeling

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    cfg = load_config(SFT, ["data.packing=true"])
    assert [modeling.attn_implementation(cfg.model, p) for p in ("no", "bf16", "fp16")] == ["sdpa", "flash_attention_2", "flash_attention_2"]
    # A class without the kernel gets the next one: asking DeBERTa for sdpa failed its load.
    assert [modeling.attn_implementation(cfg.model, p, c) for p in ("no", "bf16") for c in
            (T5ForSequenceClassification, DebertaV2ForSequenceClassification, BloomForCausalLM)] == [
        "sdpa", "eager", "eager", "sdpa", "eager", "eager"]

    class Tok:
        pad_token_id = 0

    assert tasks.for_config(cfg).collator(Tok).flatten is False  # sft_tiny: precision no
    cfg = load_config(SFT, ["data.packing=true", "train.precision=bf16"])
    assert tasks.for_config(cfg).collator(Tok).flatten is True
    cfg = load_config(SFT, ["data.packing=false", "train.precision=bf16"])
    assert tasks.for_config(cfg).collator(Tok).flatten is False


def test_stack_fact_packed_rows_need_the_kv_cache_off(data_tok):
    """transformers finds packed examples from position_ids only when no cache is in use: with
    use_cache on (a config's default), the second example silently attends to the first.
    Hence tasks/modeling.py turns the cache off for training."""
    model = _tiny_lm("llama", "sdpa", len(data_tok), data_tok)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        alone = model(input_ids=ids[:, 4:]).logits[0]
        off = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 4:]
        on = model(input_ids=ids, position_ids=pos, use_cache=True).logits[0, 4:]
    assert torch.allclose(off, alone, atol=1e-5) and not torch.allclose(on, alone, atol=1e-3)


def test_a_tokenizer_without_pad_pads_with_eos_masked_and_says_so(tmp_path):
    from launcher import tasks

    task = tasks.for_config(load_config(SFT))
    t = task_tokenizer(task, tmp_path, instructions.generate_instructions(20, 0))
    assert t.pad_token_id == t.eos_token_id and "no pad token: padding with EOS" in task.pad_note
    ids_a, lab_a = encode({"instruction": "what is the code word", "input": "", "output": "maple"}, DataConfig(), t)
    ids_b, lab_b = encode({"instruction": "what is the code word for amber zephyr?", "input": "", "output": "maple"}, DataConfig(), t)
    batch = task.collator(t)([{"input_ids": ids_a, "labels": lab_a, "seq_lens": [len(ids_a)]},
                              {"input_ids": ids_b, "labels": lab_b, "seq_lens": [len(ids_b)]}])
    k = len(ids_a)
    assert k < len(ids_b)
    assert (batch["input_ids"][0, k:] == t.eos_token_id).all()  # padded with EOS ...
    assert (batch["labels"][0, k:] == IGNORE).all() and (batch["attention_mask"][0, k:] == 0).all()  # ... masked out
    assert int(batch["labels"][0, k - 1]) == t.eos_token_id  # while the real EOS is still learned


# ---------------------------------------------------------------- runs


def _answer(run_dir: Path, question: str) -> str:
    """The training answer for a question, as the tokenizer renders it back (lowercased, spaced)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    for line in (run_dir / "data" / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("instruction") == question:
            return tok.decode(tok(row["output"], add_special_tokens=False)["input_ids"])
    raise AssertionError(question)


@pytest.mark.slow
def test_tiny_sft_learns_the_mapping_and_generates_training_answers(tmp_path):
    proc = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "sft"))
    run = tmp_path / "sft"
    final = json.loads((run / "final_metrics.json").read_text())
    # Step 0 is ~ln|V| (4.6). A model that ignored the question could at best spread its first
    # answer token over the 8 answers: ln 8 / 3 response tokens = 0.69 per token. Below 0.3 it
    # must have learned which answer goes with which question.
    assert final["before"]["loss"] > 4.0 and final["after"]["loss"] < 0.3
    assert final["after"]["perplexity"] == pytest.approx(2.718281828 ** final["after"]["loss"], rel=1e-6)
    assert "tokenizer has no pad token: padding with EOS" in proc.stdout
    # Nothing printed that does not concern the run: no MLflow download bar at each evaluation
    # (its tables are read back to append), no DeepSpeed GPU-detection warning at the export.
    assert "Downloading artifacts" not in proc.stderr and "Setting accelerator" not in proc.stdout + proc.stderr
    prompts = load_config(SFT).eval.generation_prompts
    gens = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    last = {g["prompt"]: g["response"] for g in gens if g["step"] == final["step"]}
    for prompt in prompts:
        assert last[prompt] == _answer(run, prompt)
    table = (run / "generations.md").read_text()
    assert "| step 0 |" in table and f"| step {final['step']} |" in table
    _serves_with_a_cache(run / "model")
    _plain_transformers_answers_as_the_run(run, prompts, last)
    # The same from the exported model, in a fresh process.
    gen = check(launcher("generate", str(run / "model"), "--prompt", prompts[0], "--max-new-tokens", "8"))
    assert gen.stdout.strip().splitlines()[-1] == _answer(run, prompts[0]) and "note:" not in gen.stderr
    ev = json.loads(check(launcher("eval", str(run / "model"), "--data", str(run / "data" / "validation.jsonl"))).stdout.strip().splitlines()[-1])
    assert ev["loss"] == pytest.approx(final["after"]["loss"], rel=1e-4) and ev["n"] == final["after"]["n"] == 64
    client = mlflow_client(tmp_path)
    (mlrun,) = all_runs(client)
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"generations.md", "generations.jsonl", "generations.json"} <= artifacts
    # The MLflow table: one row per prompt and evaluated step, the same answers as the local record.
    table = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "generations.json", str(tmp_path))).read_text())
    logged = [dict(zip(table["columns"], row)) for row in table["data"]]
    assert logged == [{"step": g["step"], "prompt": g["prompt"], "response": g["response"]} for g in gens]
    assert sorted({r["step"] for r in logged}) == [0, 32, 64, 96]
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "eval/perplexity")] == [0, 32, 64, 96]


@pytest.mark.slow
def test_packed_gpt2_run_learns_and_reports_efficiency(tmp_path):
    proc = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "packed",
                          "model.tiny.arch=gpt2", "data.packing=true", "train.global_batch_size=8", "train.micro_batch_size=4",
                          "train.epochs=12", "eval.every_steps=0", "checkpoint.every_steps=0",
                          "tracking.wandb=true", "tracking.wandb_mode=offline"))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("packing:"))
    efficiency = float(line.rsplit("efficiency ", 1)[1].split("%")[0]) / 100
    assert 0.6 < efficiency <= 1.0  # rows of ~23 tokens in 64-token blocks: two per block at least
    final = json.loads((tmp_path / "packed" / "final_metrics.json").read_text())
    assert final["after"]["loss"] < 0.3
    (mlrun,) = all_runs(mlflow_client(tmp_path))
    assert float(mlrun.data.params["derived.packing_efficiency"]) == pytest.approx(efficiency, abs=1e-3)
    # The unit of a packed run's batch is a block: the start line and derived params say so.
    examples, blocks = (int(x) for x in re.match(r"packing: (\d+) examples in (\d+) blocks", line).groups())
    assert examples == len((tmp_path / "packed" / "data" / "train.jsonl").read_text().splitlines())  # none dropped here
    assert mlrun.data.params["derived.n_train"] == str(examples) and mlrun.data.params["derived.n_train_blocks"] == str(blocks)
    assert f"{blocks} train blocks / " in proc.stdout and " steps of 8 blocks (4 x " in proc.stdout
    # W&B gets the generations as a Table per evaluation (step 0 and the end), files written verbatim.
    gens = [json.loads(x) for x in (tmp_path / "packed" / "generations.jsonl").read_text().splitlines()]
    (wb,) = (tmp_path / "packed" / "wandb").glob("wandb/offline-run-*")
    tables = [json.loads(f.read_text()) for f in sorted(wb.glob("files/media/table/generations_*.table.json"))]
    rows = sorted(tuple(r) for t in tables for r in t["data"])
    assert len(tables) == 2 and tables[0]["columns"] == ["step", "prompt", "response"]
    assert rows == sorted((g["step"], g["prompt"], g["response"]) for g in gens)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
def test_batched_greedy_answers_equal_transformers_generate_one_prompt_at_a_time(arch, data_tok):
    """Our decoding (left-padded batches, a prompt cache shared with the choice scoring) against
    transformers' own generate() on each prompt alone; Mistral's 5-token sliding window is
    shorter than the prompts, so its cache cannot be cut back and is rebuilt."""
    from launcher.data.prompts import PromptFormat, prompt_text, token_ids
    from launcher.tasks.causal_lm import answer_prompts

    model = _tiny_lm(arch, "sdpa", len(data_tok), data_tok)
    prompts = ["What is the code word for amber zephyr?", "code word?", "What is the code word for delta willow, please?"]
    for style in ("instruction", "chat"):
        fmt = PromptFormat(style=style)
        ids = [token_ids(prompt_text({"instruction": p}, fmt, data_tok, bare=True), data_tok) for p in prompts]
        assert len(set(map(len, ids))) == 3  # really padded
        batched = answer_prompts(model, data_tok, fmt, prompts, 6)
        for x, got in zip(ids, batched):
            out = model.generate(torch.tensor([x]), max_new_tokens=6, do_sample=False, use_cache=True,
                                 pad_token_id=data_tok.eos_token_id, eos_token_id=data_tok.eos_token_id)[0, len(x):].tolist()
            out = out[: out.index(data_tok.eos_token_id)] if data_tok.eos_token_id in out else out
            assert got == data_tok.decode(out, skip_special_tokens=True).strip()
    # Chat-trained runs prompt in the chat format, up to the assistant's turn.
    text = data_tok.decode(token_ids(prompt_text({"instruction": "hi there"}, PromptFormat(style="chat"), data_tok, bare=True), data_tok))
    assert text.replace(" ", "").endswith("<|user|>hithere<|assistant|>")


def test_the_lean_loss_self_check_passes_a_plain_head_and_catches_scaled_logits(data_tok):
    """No list of logit-scaling models: the chunked loss is compared with the model's own on a
    row. A Llama passes; a Granite (logits divided by logits_scaling) and a model whose
    forward cannot keep fewer logits are refused with the reason; the check leaves the
    model in training mode. The row compared is the first with a label, cut to a window
    around its first label when its prompt is long."""
    from transformers import GraniteConfig, GraniteForCausalLM, LlamaForCausalLM

    from launcher.tasks import lean_loss

    ids, labels, _ = encode_rows(instructions.generate_instructions(4, 1), DataConfig(max_length=64), data_tok)
    rows = [{"input_ids": x, "labels": y} for x, y in zip(ids, labels)]
    batch = lean_loss.check_batch([{"input_ids": ids[0], "labels": [IGNORE] * len(ids[0])}] + rows)
    assert batch["input_ids"].tolist() == [ids[0]] and batch["labels"].tolist() == [labels[0]]  # the first with a label
    llama = _tiny_lm("llama", "sdpa", len(data_tok), data_tok).train()
    assert lean_loss.self_check(llama, batch, 7) is None and llama.training
    long = {"input_ids": list(range(3, 603)), "labels": [IGNORE] * 580 + list(range(583, 603))}
    cut = lean_loss.check_batch([long])
    assert cut["input_ids"].shape[1] == 276 and int((cut["labels"] != IGNORE).sum()) == 20  # from 256 before the label
    assert lean_loss.check_batch([{"input_ids": [1, 2], "labels": [5, IGNORE]}]) is None  # nothing predicted
    torch.manual_seed(0)
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=len(data_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, logits_scaling=4.0))
    granite.config.use_cache = False
    assert lean_loss.supported(granite)  # structurally it could run...
    why = lean_loss.self_check(granite, batch, 7)
    assert why and "differs from GraniteForCausalLM's own loss" in why  # ...but its logits are scaled

    class NoKeep(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   num_items_in_batch=num_items_in_batch)

    no_keep = NoKeep(llama.config)
    # The chunked loss needs no logits_to_keep (the head sees every position); evaluation's lean
    # head does (it keeps one position of logits), so a model without it evaluates on its own logits.
    assert lean_loss.self_check(no_keep, batch, 7) is None
    assert lean_loss.whole_head(llama) and not lean_loss.whole_head(no_keep)
    assert lean_loss.eval_head(no_keep, 7, batch) == (None, None)

    class LastOnly(LlamaForCausalLM):  # without labels, calls its head on the last position only
        def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, **kw):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                   num_items_in_batch=num_items_in_batch, logits_to_keep=0 if labels is not None else 1)

    why = lean_loss.self_check(LastOnly(llama.config), batch, 7)
    assert why and why.startswith("it fails on this model (ValueError: the output head was called on (1, 1, 32)")
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class Halved(LlamaForCausalLM):  # changes the hidden states between its decoder and its head
        def forward(self, input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None, logits_to_keep=0, **kw):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state * 0.5
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size,
                                                                   num_items_in_batch=num_items_in_batch)
            return CausalLMOutputWithPast(loss=loss, logits=logits)

    halved = Halved(llama.config)
    # The chunked loss runs inside its forward and sees what the head sees; evaluation's lean
    # head reads the decoder's output, so it is checked on its own and refused here.
    assert lean_loss.whole_head(halved) and lean_loss.self_check(halved, batch, 7) is None
    why = lean_loss.self_check(halved, batch, 7, evaluation=True)
    assert why and "differs from Halved's own loss" in why and lean_loss.eval_head(halved, 7, batch) == (None, why)
    odd = LlamaForCausalLM(llama.config)  # a head whose forward is not nn.Linear's (a peft or bitsandbytes layer)
    odd.lm_head.__class__ = type("ScaledHead", (torch.nn.Linear,), {"forward": lambda self, x: 2 * super(type(self), self).forward(x)})
    assert not lean_loss.supported(odd)
    assert lean_loss.self_check(odd, batch, 7) == "its output head is test_sft.ScaledHead, not a plain torch.nn.Linear"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "llama-head-bias", "llama-lora"])
def test_lean_loss_equals_the_models_own_loss_and_gradients(arch, data_tok):
    """Chunks of 7 labelled tokens (so chunks straddle rows), packed and padded rows. The head
    computes its gradients in the forward pass (lean_loss.HeadLoss): checked with tied
    embeddings (gpt2), a final logit softcap (gemma2), a head with a bias, and a frozen head
    under LoRA (no weight gradient is made for it)."""
    from launcher.tasks import lean_loss

    if arch == "gemma2":
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(data_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                               final_logit_softcapping=0.2, use_cache=False)).train()
    else:
        model = _tiny_lm(arch.split("-")[0], "sdpa", len(data_tok), data_tok).train()
    if arch == "llama-head-bias":
        model.lm_head = torch.nn.Linear(32, len(data_tok), bias=True)
    if arch == "llama-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids, labels, _ = encode_rows(instructions.generate_instructions(12, 1), DataConfig(max_length=64), data_tok)
    p_ids, p_labels, p_lens = pack(ids, labels, 64)
    p_ids[1], p_labels[1], p_lens[1] = ids[5], labels[5], [len(ids[5])]
    batch = LMCollator(data_tok.eos_token_id, packed=True)(
        [{"input_ids": p_ids[r], "labels": p_labels[r], "seq_lens": p_lens[r]} for r in (0, 1)])
    assert lean_loss.supported(model)
    own = model(**batch, num_items_in_batch=torch.tensor(1.0)).loss
    (own * 0.37).backward()  # a scale, as accumulation and loss scaling apply: the head's gradients follow it
    want = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    lean = lean_loss.loss_sum(model, batch, chunk=7)
    (lean * 0.37).backward()
    assert lean.item() == pytest.approx(own.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert (p.grad is None) == (want[n] is None), n
        assert p.grad is None or torch.allclose(p.grad, want[n], atol=1e-6, rtol=1e-4), n
    assert (model.get_output_embeddings().weight.grad is None) == (arch == "llama-lora")
    if arch == "gemma2":  # the softcap matters here, and is the model's own again afterwards
        assert model.config.final_logit_softcapping == 0.2


def test_export_of_a_tied_gpt2_checkpoint_is_the_runs_model(tmp_path):
    """GPT-2 ties lm_head to the token embeddings; accelerate's safetensors writer saves the pair
    once. `launcher export` of the checkpoint still gives every weight of the run's own export,
    and a checkpoint whose weights do not fit its config is one line, exit 2, nothing left."""
    from safetensors.torch import load_file, save_file

    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "g", "model.tiny.arch=gpt2",
                   "train.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=0", "eval.at_start=false"))
    ckpt = tmp_path / "g" / "checkpoints" / "step-000004"
    saved = load_file(ckpt / "model.safetensors")
    assert "lm_head.weight" not in saved and "transformer.wte.weight" in saved  # the tied pair, saved once
    check(launcher("export", str(ckpt), str(tmp_path / "out")))
    mine, run = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "g" / "model" / "model.safetensors")
    assert mine.keys() == run.keys() and all(torch.equal(mine[k], run[k]) for k in run)

    del saved["transformer.h.0.mlp.c_fc.weight"]
    save_file(saved, ckpt / "model.safetensors")
    proc = launcher("export", str(ckpt), str(tmp_path / "bad"))  # another size than it was sealed at
    assert proc.returncode == 2 and proc.stderr.strip().startswith(
        f"error: {ckpt}: files were removed or changed size after it was sealed (model.safetensors: "), proc.stderr[-2000:]
    proc = launcher("export", str(ckpt), str(tmp_path / "bad"), "--trust-checkpoint")  # exported as it is
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: {ckpt}: its weights do not fit the model in skeleton/config.json: missing "
                                   "['transformer.h.0.mlp.c_fc.weight'], unexpected []")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_a_saved_gpt2_is_evaluated_and_answers_at_its_full_position_table(tmp_path):
    """An exported GPT-2 (from_pretrained from its directory) evaluated with --max-length at its
    n_positions, on rows that fill the table, and asked a prompt longer than the table: the
    answers stop at the table's end (it indexed outside it: IndexError)."""
    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "g", "model.tiny.arch=gpt2",
                   "train.max_steps=2", "eval.every_steps=0", "eval.at_start=false"))
    model = tmp_path / "g" / "model"
    table = json.loads((model / "config.json").read_text())["n_positions"]
    question = "What is the code word for amber zephyr? "
    rows = [{"instruction": question * 12 + "amber " * k, "output": "amber zephyr"} for k in range(16)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scored = json.loads(check(launcher("eval", str(model), "--data", str(data), "--max-length", str(table))).stdout)
    assert scored["n"] == len(rows) - scored["dropped"] > 0 and scored["truncated"] >= 1, scored  # rows that fill it
    said = check(launcher("generate", str(model), "--prompt", question * 40, "--max-new-tokens", "8"))
    assert "Traceback" not in said.stderr
    # predict answers after the prompt: --max-length at the table leaves no room (an IndexError)
    (tmp_path / "q.txt").write_text(question * 40 + "\n")
    proc = launcher("predict", str(model), "--input", str(tmp_path / "q.txt"), "--max-length", str(table), "--max-new-tokens", "8")
    assert "Traceback" not in proc.stderr
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, f"error: --max-length: {table} is more tokens than the model has "
                                                         f"positions for ({table} less 8 tokens for the answer); "
                                                         f"give {table - 8} or less"), proc.stderr[-2000:]
    check(launcher("predict", str(model), "--input", str(tmp_path / "q.txt"), "--max-length", str(table - 8), "--max-new-tokens", "8"))
    proc = launcher("predict", str(model), "--input", str(tmp_path / "q.txt"), "--max-length", "8", "--max-new-tokens", str(table))
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, f"error: --max-new-tokens: {table} leaves no room "
                                                                          f"for a prompt in the model's {table} positions; "
                                                                          f"give fewer than {table}"), proc.stderr[-2000:]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_predict_and_generate_answer_a_prompt_longer_than_the_positions_alike(arch, tmp_path):
    """One rule for both commands: a prompt past a learned position table (GPT-2's) keeps the end
    that leaves the answer room, and one past rotary positions (Llama's) is fed whole. So
    `launcher predict` on a line and `launcher generate` on the same prompt give one answer (predict
    cut every model's prompts at max_position_embeddings less the answer, generate only GPT-2's).
    The export's weights are replaced by a wide random draw: two training steps answer every
    prompt alike, these weights answer each differently."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "m", f"model.tiny.arch={arch}",
                   "train.max_steps=2", "eval.every_steps=0", "eval.at_start=false"))
    model = tmp_path / "m" / "model"
    config = AutoConfig.from_pretrained(str(model))
    config.initializer_range = 0.5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model))
    table = getattr(config, "n_positions", None) or config.max_position_embeddings
    new = json.loads((model / "launcher.json").read_text()).get("max_new_tokens", 32)
    prompt = "What is the code word for amber zephyr? " * 40
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > table  # past the positions

    said = []

    def generate(text):
        proc = check(launcher("generate", str(model), "--prompt", text, "--max-new-tokens", str(new)))
        said.append(proc.stderr)
        return proc.stdout.strip()

    (tmp_path / "prompts.txt").write_text(prompt + "\n" + "hi\n")
    proc = check(launcher("predict", str(model), "--input", str(tmp_path / "prompts.txt")))
    predicted, short = [json.loads(x) for x in proc.stdout.splitlines()]
    assert predicted["response"] == generate(prompt) != ""
    # Both say so (answered without a word before): past the rows the run trained on (max_length
    # 64), and with rotary positions past max_position_embeddings too (a learned table cut it).
    trained = json.loads((model / "launcher.json").read_text())["max_length"]
    longer = f"as long as the run's data.max_length ({trained}) or longer: no row it trained on had an answer past it"
    past = f"past the model's max_position_embeddings ({table})"
    (note,) = [x for x in proc.stderr.splitlines() if x.startswith("note: 1 of 2 prompts are ")]
    assert note.startswith(f"note: 1 of 2 prompts are {longer}") and (past in note) == (arch == "llama"), note
    assert note.endswith(": they are answered, less reliably"), note
    # generate says of its cut what predict says (a learned table keeps the prompt's end)
    assert ("note: the prompt was longer than" in said[0]) == (arch == "gpt2") == ("prompts were longer than" in proc.stderr)
    (note,) = [x for x in said[0].splitlines() if x.startswith("note: the prompt (")]
    fed = int(note.split("(")[1].split()[0])  # the prompt's tokens as answered: cut to the table less the answer
    assert (fed > table if arch == "llama" else fed == table - new) and longer in note and (past in note) == (arch == "llama"), note
    assert short["response"] is not None and not [x for x in proc.stderr.splitlines() if "1 of 2" not in x and "note:" in x]
    generate("hi")
    assert "note:" not in said[-1], said[-1]
    if arch == "llama":  # fed whole: not the answer to the prompt's end that the old cut kept
        assert predicted["response"] != generate(tokenizer.decode(ids[-(table - new):]))


def test_capitalised_roles_and_a_conversation_in_a_csv_cell_read_as_the_jsonl_rows(tmp_path):
    """`"role": "User"` was refused in `messages` while ShareGPT's `"from": "Human"` was
    lowercased; a CSV's `messages` cell (the conversation's JSON, as pandas' to_csv writes a
    list column as JSON text only when asked) was refused row by row as "not a list"."""
    import csv

    from launcher.data import pipeline, prompts, sources
    from launcher.data.prompts import PromptFormat

    convs = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"question {i}, with a comma"},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(3)]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    caps = tmp_path / "caps.jsonl"
    caps.write_text("".join(json.dumps({"messages": [{**m, "role": r} for m, r in zip(c, ("System", "USER", " Assistant"))]}) + "\n"
                            for c in convs))
    cells = tmp_path / "cells.csv"
    with open(cells, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([json.dumps(c)] for c in convs)
    want = instructions.read_rows(plain)
    assert want == [{"messages": c} for c in convs]
    assert instructions.read_rows(caps) == want and instructions.read_rows(cells) == want  # eval's reader
    sharegpt = tmp_path / "sharegpt.jsonl"  # (ShareGPT's `from`, padded as `role` above)
    sharegpt.write_text("".join(json.dumps({"conversations": [{"from": f, "value": m["content"]} for m, f in
                                                              zip(c, (" system", "Human ", " GPT"))]}) + "\n" for c in convs))
    assert instructions.read_rows(sharegpt) == want
    raw = sources.Source("file", str(cells), "train", "data.train_file").read(tmp_path / "ds")  # training's reader
    assert [prompts.normalize(r, PromptFormat(), "row") for r in pipeline.records(raw[:])] == want
    bad = tmp_path / "bad.csv"
    bad.write_text('messages\n"[{""role"": ""user"""\n')
    with pytest.raises(DataError) as e:
        instructions.read_rows(bad)
    assert e.value.problems[0].startswith(f"{bad}:2: 'messages' is not a JSON list (")


def _plain_transformers_answers_as_the_run(run: Path, questions: list[str], answers: dict) -> None:
    """The export through plain transformers, as a user serves it: the tokenizer given the
    prompt text (add_special_tokens as default) gives the ids training gave it, and greedy
    generate answers as the run did. The tiny tokenizer added no <s>, which every training row
    starts with: plain generate saw prompts no row had trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.data import prompts as P

    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    fmt = P.PromptFormat.from_json(json.loads((run / "model" / "launcher.json").read_text()))
    for question in questions:
        row = {"instruction": question}
        ids = tok(P.prompt_text(row, fmt, tok))["input_ids"]
        assert ids == P.prompt_ids(row, fmt, tok) and ids[0] == tok.bos_token_id
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        assert tok.decode(out[0, len(ids):], skip_special_tokens=True).strip() == answers[question].strip(), question


def _serves_with_a_cache(model_dir: Path) -> None:
    """Training turns the key/value cache off; an export kept it off, and plain transformers'
    generate then ran without it (3.3x slower per 100 tokens on SmolLM2)."""
    from transformers import AutoModelForCausalLM

    for name in ("config.json", "generation_config.json"):
        assert json.loads((model_dir / name).read_text()).get("use_cache", True) is True, name
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.use_cache is True and model.generation_config.use_cache is True


def test_a_lora_export_and_its_offline_export_generate_with_the_cache_on(tmp_path):
    trained = check(launcher("train", str(CONFIGS / "train" / "sft_lora_tiny.yaml"), "--output-dir", str(tmp_path), "--run-name",
                             "l", "train.max_steps=2", "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=2"))
    # Its head trains whole (modules_to_save): the run turns the chunked loss off, and the plan,
    # which sized the chunk's logits, says so too.
    assert any(x.startswith("train.loss_chunk_tokens: the chunked loss is off: its output head is peft.utils.other.ModulesToSaveWrapper")
               for x in trained.stdout.splitlines() + trained.stderr.splitlines()), trained.stdout
    planned = check(launcher("plan", str(CONFIGS / "train" / "sft_lora_tiny.yaml"))).stdout
    assert "the chunked loss is off: model.lora.modules_to_save wraps the output head" in planned and "per chunk" not in planned
    run = tmp_path / "l"
    for model_dir in (run / "model", run / "model" / "base"):
        _serves_with_a_cache(model_dir)
    check(launcher("export", str(run / "checkpoints" / "step-000002"), str(tmp_path / "again")))
    _serves_with_a_cache(tmp_path / "again")
    # A random base has no name to give (model/base/ holds it): not the checkpoint's skeleton,
    # which rotation removes, from launcher export either.
    for model_dir in (run / "model", tmp_path / "again"):
        assert json.loads((model_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_a_special_tokens_text_is_counted_in_a_rows_own_words_not_in_the_templates(tok):
    """data.response may end on a special token on purpose ("{a} </s>"): a column value quoting it
    is still counted (the token was left out of the search when a template wrote it)."""
    import datasets

    enc = instructions.InstructionEncoder(DataConfig(prompt="say {q}", response="{a} </s>"), tok)
    rows = [{"q": "hello", "a": "general </s> kenobi"}, {"q": "hello", "a": "general kenobi"}, {"q": "</s>", "a": "maple"}]
    ds = datasets.Dataset.from_list(rows)
    stats = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))[1]
    assert (stats["control_text"], stats["control_token"]) == (2, "</s>")


def test_rows_with_an_empty_answer_or_a_special_tokens_text_are_counted_in_notes(tmp_path):
    """Rows whose answer is empty (`"output": ""`, an empty assistant turn) trained without a
    word: each teaches only the end of the turn, and a file of them teaches a model to say
    nothing; as validation rows, only an empty reply matches them. Rows whose words hold a special token's text ("</s>") are tokenized as that token,
    which ends the row there. The run counts both in notes; a file without any has none. LoRA
    settings given while LoRA is off are said to be unused (the run trained every weight)."""
    rows = [{"instruction": f"name the colour of thing {i}", "output": "" if i % 10 == 0 else f"colour {i % 3}"}
            for i in range(30)]
    rows += [{"messages": [{"role": "user", "content": "say nothing"}, {"role": "assistant", "content": "  "}]}] * 2
    rows += [{"instruction": "how does a row end", "output": "with </s> then more"}] * 3  # (the tokenizer's EOS as text)
    full = tmp_path / "train.jsonl"
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("output") and "<" not in r["output"]))  # (the
    # conversations, the empty answers and the special token out)
    args = ["train", str(CONFIGS / "train" / "sft_tiny.yaml"), "--output-dir", str(tmp_path), "data.synthetic.enabled=false",
            f"data.validation_file={plain}", "train.max_steps=1", "train.global_batch_size=8", "train.micro_batch_size=8",
            "eval.every_steps=0", "eval.at_start=false", "checkpoint.every_steps=0", "tracking.mlflow=false"]
    out = check(launcher(*args, "--run-name", "empty", f"data.train_file={full}", f"data.validation_file={full}")).stdout.splitlines()
    assert ("note: 5 of 35 training rows have an empty answer: they teach the model to end its turn at once") in out, out
    assert ("note: 5 of 35 validation rows have an empty reference: exact match counts only an empty reply right for "
            "them") in out, out
    assert ("note: 3 of 35 training rows hold the text of a special token in their own words (</s> first): it is read as "
            "that token, not as text (a chat template's rendering does the same); escape or drop it if it is meant as "
            "text") in out, out
    assert "note: model.lora.enabled is false" not in "\n".join(out)
    # LoRA settings given without model.lora.enabled train every weight: said, not silent.
    plain_out = check(launcher(*args, "--run-name", "plain", f"data.train_file={plain}", "model.lora.r=4",
                               "model.lora.target_modules=[q_proj]")).stdout.splitlines()
    assert not [x for x in plain_out if "empty answer" in x or "empty reference" in x or "special token" in x]
    assert ("note: model.lora.enabled is false: model.lora.r, target_modules set but unused; every weight trains "
            "(model.lora.enabled=true trains adapters)") in plain_out, plain_out
