"""Metrics follow LexGLUE: checked against scikit-learn as an independent reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from launcher.config import UNFAIR_TOS_CATEGORIES
from launcher.tasks.classification import class_weights, compute_metrics


def test_binary_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(97, 2, generator=g)
    labels = torch.randint(0, 2, (97,), generator=g)
    m = compute_metrics(logits, labels, ["fair", "unfair"])
    pred = logits.argmax(-1).numpy()
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["micro_f1"] == pytest.approx(f1_score(labels, pred, average="micro"))
    assert m["accuracy"] == pytest.approx((pred == labels.numpy()).mean())
    assert m["f1/unfair"] == pytest.approx(f1_score(labels, pred))


def test_multilabel_lexglue_none_column_matches_sklearn():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(120, 8, generator=g) - 1.5  # most rows predicted with no category
    labels = (torch.rand(120, 8, generator=g) < 0.1).float()
    m = compute_metrics(logits, labels, UNFAIR_TOS_CATEGORIES)
    y_true = labels.numpy().astype(int)
    y_pred = (torch.sigmoid(logits) > 0.5).numpy().astype(int)
    # LexGLUE adds a "none" column: 1 where a clause has no category, in truth and prediction.
    y_true = np.concatenate([y_true, (y_true.sum(1) == 0)[:, None]], 1)
    y_pred = np.concatenate([y_pred, (y_pred.sum(1) == 0)[:, None]], 1)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert m["f1/none"] == pytest.approx(f1_score(y_true[:, 8], y_pred[:, 8]))
    assert "accuracy" not in m
    assert len([k for k in m if k.startswith("f1/")]) == 9


def test_multiclass_matches_sklearn():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(90, 3, generator=g)
    labels = torch.randint(0, 3, (90,), generator=g)
    m = compute_metrics(logits, labels, ["negative", "neutral", "positive"])
    pred = logits.argmax(-1).numpy()
    assert m["macro_f1"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert m["accuracy"] == pytest.approx((pred == labels.numpy()).mean())
    assert m["f1/neutral"] == pytest.approx(f1_score(labels, pred, labels=[1], average="macro"))


def test_the_none_column_counts_only_where_rows_have_no_category():
    """Every row of topic data has a category: LexGLUE's none column then scored F1 0 in
    macro-F1 and a perfect model got 0.75 on three categories. The rows alone decide the column,
    so an evaluation's score does not jump when one prediction comes out empty (a column that
    came and went with the predictions ranked 100 wrong rows above one empty one)."""
    rng = np.random.default_rng(0)
    names = ["Sports", "Politics", "Tech"]
    labels = torch.as_tensor(np.eye(3)[rng.integers(0, 3, 1000)], dtype=torch.float)
    perfect = labels * 8 - 4
    m = compute_metrics(perfect, labels, names)
    assert m["macro_f1"] == 1.0 and "f1/none" not in m
    one_empty, many_wrong = perfect.clone(), perfect.clone()
    one_empty[0] = -4
    many_wrong[:100] = torch.roll(perfect[:100], 1, dims=1)
    empty_score, wrong_score = (compute_metrics(x, labels, names)["macro_f1"] for x in (one_empty, many_wrong))
    assert 1.0 > empty_score > wrong_score, (empty_score, wrong_score)
    y_pred = (one_empty > 0).numpy().astype(int)
    assert empty_score == pytest.approx(f1_score(labels.numpy().astype(int), y_pred, average="macro", zero_division=0))
    # Rows with no category: the column counts (LexGLUE's), as before.
    labels[:10] = 0
    assert "f1/none" in compute_metrics(perfect, labels, names)


def test_balanced_weights():
    assert class_weights(torch.tensor([0, 1, 1, 2, 2, 2]), multilabel=False, classes=4).tolist() == pytest.approx(
        [6 / 4, 6 / 8, 6 / 12, 1.0])  # scikit-learn's n / (k n_c); a class never seen keeps 1
    assert class_weights(torch.tensor([0, 0, 0, 1]), multilabel=False).tolist() == pytest.approx([4 / 6, 4 / 2])
    pw = class_weights(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]), multilabel=True)
    assert pw.tolist() == [1.0, 1.0]  # 2 neg / 2 pos; a never-positive category keeps 1


def test_model_flops_per_token_and_peaks():
    """PaLM's count: 6N + 12*L*h*s for full fine-tuning; ~4N (+ the attention term alike)
    with a frozen base; peaks from the data sheets, an explicit one wins, unknown: none."""
    from launcher import throughput

    n, layers, hidden, seq = 124_000_000, 12, 768, 1024
    assert throughput.flops_per_token(n, n, layers, hidden, seq) == 6 * n + 12 * layers * hidden * seq
    lora = throughput.flops_per_token(n, n // 100, layers, hidden, seq)
    assert lora == pytest.approx(4 * n + 8 * layers * hidden * seq)
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "bf16", None) == 989e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-40GB", "no", None) == 156e12
    assert throughput.peak_flops("NVIDIA A100-SXM4-40GB", "bf16", 100.0) == 100e12
    assert throughput.peak_flops("Tesla T4", "bf16", None) is None


def test_mfus_attention_term_reads_the_context_tokens_attend_over_not_max_length():
    """MFU's 12*L*h*s took s = data.max_length. A token attends over its own example: s is the
    mean over training tokens of their example's length, sum(s^2) / sum(s), from the rows as
    tokenized (a packed block's examples apart, as they attend only within themselves), so
    short examples in long blocks no longer inflate MFU."""
    import datasets

    from launcher.config import DataConfig
    from launcher.data import instructions, pipeline
    from launcher.data.tokenizer import train_lm_tokenizer

    rows = [{"instruction": "q " * n, "input": "", "output": "a " * (n % 5 + 1)} for n in range(3, 40, 3)]
    tok = train_lm_tokenizer(["q a"], 50, 64)
    for packing in (False, True):
        cfg = DataConfig(max_length=128, packing=packing)
        enc = instructions.InstructionEncoder(cfg, tok)
        table, meta = enc.finish(datasets.Dataset.from_list(rows).map(enc, batched=True, remove_columns=["instruction", "input", "output"]))
        split = pipeline.TokenRows(table, {"stats": meta}, False, ("input_ids", "labels", "seq_lens"))
        lengths = [len(instructions.encode(r, cfg, tok)[0]) for r in rows]
        assert (len(split) < len(rows)) == packing  # packed: blocks of several examples
        assert split.attention_context() == pytest.approx(sum(n * n for n in lengths) / sum(lengths))
        assert split.attention_context() < max(lengths) < cfg.max_length


def test_mfu_counts_the_weights_a_token_is_multiplied_by():
    """N in 6N leaves out the embedding tables (lookups): a tiny BERT classifier loses its
    word, position and token-type tables; GPT-2 its position table but not the word table,
    which is also its head; an untied Llama its input table but not its head. LoRA wrapping
    changes nothing but the adapters added. (Counting the tables doubled MiniLM's MFU.)"""
    import transformers
    from peft import LoraConfig, get_peft_model

    from launcher import throughput
    from launcher.engines import full_numel

    def without(model, *names):
        return sum(p.numel() for n, p in model.named_parameters() if not any(x in n for x in names))

    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=500, n_embd=32, n_layer=2, n_head=2))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        tie_word_embeddings=False))
    expected = {bert: without(bert, "word_embeddings", "position_embeddings", "token_type_embeddings"),
                gpt2: without(gpt2, "wpe"), llama: without(llama, "embed_tokens")}
    for model, want in expected.items():
        assert throughput.matmul_params(model, full_numel) == want < sum(p.numel() for p in model.parameters())
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # the tie the count relies on
    lora = get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert throughput.matmul_params(lora, full_numel) == without(lora, "embed_tokens")
    n = sum(p.numel() for p in lora.parameters())
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    m = throughput.matmul_params(lora, full_numel)
    assert throughput.flops_per_token(m, trainable, 2, 32, 16, n) == pytest.approx(4 * m + 8 * 2 * 32 * 16)
