"""Causal-LM instruction fine-tuning: tokenizer and pad policy, model, token-level loss,
validation loss / perplexity, greedy sample generations, exported-model helpers.

Training sums token losses over a micro-batch's response tokens (labels -100 elsewhere);
the loop divides by the response tokens of the whole global batch. Evaluation sums token
losses and token counts over all ranks first, so perplexity
is exp(total loss / total response tokens), each validation example counted once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from launcher.config import TINY_MODEL, RunConfig
from launcher.data import instructions
from launcher.errors import ConfigError, DataError
from launcher.models import from_pretrained, inference_device


def tiny_config(cfg: RunConfig, vocab_size: int, tokenizer):
    from transformers import GPT2Config, LlamaConfig

    t = cfg.model.tiny
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    positions = max(cfg.data.max_length, 16) + cfg.eval.max_new_tokens + 64  # prompts + generations
    if t.arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=t.hidden_size, n_layer=t.num_layers, n_head=t.num_heads,
                          n_inner=t.intermediate_size, n_positions=positions, resid_pdrop=t.dropout,
                          embd_pdrop=t.dropout, attn_pdrop=t.dropout, **ids)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                       num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
                       intermediate_size=t.intermediate_size, max_position_embeddings=positions,
                       attention_dropout=t.dropout, tie_word_embeddings=False, **ids)


_ONE = torch.tensor(1.0)


class CausalLMTask:
    name = "causal_lm"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.pad_note = ""
        self.prompt_format = "instruction"  # "chat" when most training rows are conversations
        self._lean_ok: dict[int, bool] = {}

    # ---- sources and data

    def check_model_source(self) -> None:
        if self.cfg.model.name != TINY_MODEL:
            from transformers import AutoConfig

            from_pretrained(AutoConfig, self.cfg.model.name, self.cfg.model)

    def random_init(self) -> bool:
        return self.cfg.model.name == TINY_MODEL

    def sources(self, train_file, val_file):
        """Where each split's rows come from: local files, save_to_disk directories, or the
        hub dataset (data.hub_dataset with data.train_split / validation_split)."""
        import dataclasses

        from launcher.data import sources

        d = dataclasses.replace(self.cfg.data, train_file=train_file, validation_file=val_file)
        return sources.resolve(d, "train"), sources.resolve(d, "validation")

    def write_synthetic(self, out_dir: Path):
        s = self.cfg.data.synthetic
        return tuple(str(p) for p in instructions.write_instruction_splits(out_dir, s.n_train, s.n_validation, s.seed))

    def tokenizer(self, saved_dir: Path, train_source, cache):
        from transformers import AutoTokenizer

        if self.cfg.model.name != TINY_MODEL:
            tok = from_pretrained(AutoTokenizer, self.cfg.model.name, self.cfg.model)
        elif (saved_dir / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(saved_dir)
        else:
            from launcher.data import pipeline
            from launcher.data.tokenizer import train_lm_tokenizer

            class _Plain:  # render without special tokens: the tokenizer does not exist yet
                eos_token, chat_template = "", None

            def train(source):
                texts = []
                for record in pipeline.first_rows(source, cache):
                    try:
                        texts.append(instructions.render(instructions.parse_row(record, ""), self.cfg.data, _Plain)[0])
                    except DataError:
                        pass  # reported with its file:line when the rows are tokenized
                texts += self.cfg.eval.generation_prompts
                return train_lm_tokenizer(texts, self.cfg.model.tiny.vocab_size, self.cfg.data.max_length)

            d = self.cfg.data
            key = {"kind": "lm-wordpiece", "vocab_size": self.cfg.model.tiny.vocab_size, "max_length": d.max_length,
                   "templates": [d.prompt_template, d.prompt_template_no_input, d.chat_turn_template],
                   "prompts": self.cfg.eval.generation_prompts}
            tok = pipeline.tokenizer_from_cache(train_source, cache, key, train)
        if tok.eos_token_id is None:
            raise ConfigError(f"model.name: {self.cfg.model.name}: the tokenizer has no EOS token to end responses with")
        if tok.pad_token_id is None:
            # Reuse EOS for padding: padded positions get attention 0 and label -100 while
            # real EOS tokens keep their labels (labels come from spans, not from token ids).
            tok.pad_token = tok.eos_token
            self.pad_note = f"tokenizer has no pad token: padding with EOS (id {tok.eos_token_id}), masked out of attention and loss"
        return tok

    def datasets(self, train_source, val_source, tokenizer, cache):
        """Token rows of both splits, checked, tokenized (and packed) once per cache, memory-mapped."""
        import dataclasses

        from launcher.data import pipeline
        from launcher.data.batching import tokenizer_fingerprint

        d = self.cfg.data
        out = []
        # Validation is never packed: loss per example, and generations need single prompts.
        for src, cfg in ((train_source, d), (val_source, dataclasses.replace(d, packing=False))):
            encode = instructions.InstructionEncoder(cfg, tokenizer)
            key = {"task": self.name, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "chat_template": getattr(tokenizer, "chat_template", None), "max_length": cfg.max_length,
                   "truncation": cfg.truncation, "packing": cfg.packing,
                   "templates": [cfg.prompt_template, cfg.prompt_template_no_input, cfg.chat_turn_template]}
            split = pipeline.Split(src, encode, ("input_ids", "labels", "seq_lens"), key, check=encode.check, finish=encode.finish)
            out.append(pipeline.prepare(split, cache, d.num_proc))
        stats = out[0].meta["stats"]
        self.prompt_format = "chat" if stats.get("chat_rows", 0) * 2 > stats["rows"] else "instruction"
        return tuple(out)

    def describe(self, train_ds, val_ds) -> tuple[list[str], dict]:
        d = self.cfg.data
        train_stats = instructions.EncodeStats(**train_ds.meta["stats"])
        val_stats = instructions.EncodeStats(**val_ds.meta["stats"])
        lines = [train_stats.line("train"), val_stats.line("validation")]
        derived = {"derived.train_truncated": train_stats.truncated, "derived.train_dropped": train_stats.dropped,
                   "derived.train_response_tokens": train_stats.label_tokens}
        if d.packing:
            eff = train_ds.packing_efficiency(d.max_length)
            greedy = train_stats.tokens / max(1, d.max_length * train_stats.blocks_greedy)
            lines.append(f"packing: {train_stats.rows - train_stats.dropped} examples in {len(train_ds)} blocks of "
                         f"{d.max_length} tokens (best-fit decreasing; in order: {train_stats.blocks_greedy}); "
                         f"efficiency {eff:.1%} (real tokens / block slots; in order: {greedy:.1%})")
            derived["derived.packing_efficiency"] = round(eff, 4)
            derived["derived.packing_efficiency_in_order"] = round(greedy, 4)
        if self.pad_note:
            lines.append(self.pad_note)
        return lines, derived

    # ---- model and loss

    def build_model(self, tokenizer, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        from launcher.tasks import modeling

        attn = modeling.attn_implementation(self.cfg.model)
        if self.cfg.model.name == TINY_MODEL:
            model = AutoModelForCausalLM.from_config(tiny_config(self.cfg, len(tokenizer), tokenizer), attn_implementation=attn)
        else:
            model = from_pretrained(AutoModelForCausalLM, self.cfg.model.name, self.cfg.model, attn_implementation=attn,
                              dtype=modeling.torch_dtype(dtype))
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        return modeling.finish(model, self.cfg, self.name, dtype)

    def collator(self, tokenizer):
        return instructions.LMCollator(tokenizer.pad_token_id, self.cfg.data.packing)

    def prepare(self, train_ds, device) -> None:
        pass

    def loss_items(self, batch) -> float:
        """Response tokens that are predicted (labels shift by one)."""
        return float((batch["labels"][:, 1:] != instructions.IGNORE).sum())

    def loss_sum(self, model, batch) -> torch.Tensor:
        """Sum of token losses over the micro-batch's response tokens. Lean (tasks/lean_loss.py:
        the head runs on labelled positions only, in checkpointed chunks) unless
        train.loss_chunk_tokens is 0 or the model scales its logits; else the model's own loss
        with num_items_in_batch=1 (its cross-entropy then sums instead of averaging)."""
        from launcher.tasks import lean_loss

        chunk = self.cfg.train.loss_chunk_tokens
        if chunk and self._lean_ok.setdefault(id(model), lean_loss.supported(model)):
            return lean_loss.loss_sum(model, batch, chunk)
        return model(**batch, num_items_in_batch=_ONE).loss

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, rt, model, loader) -> dict:
        """Validation loss and perplexity over response tokens; each example counted once."""
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (sum of token losses, tokens)
        for batch in loader:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            labels = batch["labels"][:, 1:]
            losses = token_losses(logits[:, :-1], labels)
            keep = labels != instructions.IGNORE
            # gather_for_metrics drops the duplicated rows padding the last batch across ranks
            per_row = rt.accelerator.gather_for_metrics(torch.stack([(losses * keep).sum(1), keep.sum(1)], 1).double())
            total += per_row.sum(0).to(total.device)
        model.train()
        loss = float(total[0] / total[1].clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(loader.dataset), "tokens": int(total[1])}

    @torch.no_grad()
    def tune(self, rt, model, loader) -> None:
        """No decision rule to tune for a language model."""
        return None

    def samples(self, rt, model, tokenizer) -> list[dict]:
        """Greedy answers to eval.generation_prompts. Every rank generates (under ZeRO-3 the
        forward passes are collectives); rank 0 logs them."""
        prompts = self.cfg.eval.generation_prompts
        if not prompts:
            return []
        unwrapped = rt.unwrap(model)
        model.eval()
        # ZeRO-3: every rank must run as many forward passes as the longest answer needs.
        # Otherwise transformers decides (it also detects FSDP-managed modules).
        responses = generate_batch(unwrapped, tokenizer, self.cfg.data, prompts, self.cfg.eval.max_new_tokens,
                                   chat=self.prompt_format == "chat", device=rt.device,
                                   synced_gpus=True if rt.zero_stage == 3 else None)
        model.train()
        return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]

    def count_parameters(self) -> tuple[int | None, str]:
        """(parameter count, source) from the model config alone, built on the meta device."""
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.cfg.model.name == TINY_MODEL:
            class _Ids:
                bos_token_id, eos_token_id, pad_token_id = 1, 2, None

            config = tiny_config(self.cfg, self.cfg.model.tiny.vocab_size, _Ids)
            source = f"tiny {self.cfg.model.tiny.arch}, vocabulary at most {self.cfg.model.tiny.vocab_size}"
        else:
            try:
                config = from_pretrained(AutoConfig, self.cfg.model.name, self.cfg.model)
            except ConfigError as e:
                return None, e.problems[0]
            source = f"config of {self.cfg.model.name}"
        self.model_config = config  # `launcher plan` sizes activations from it
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters()), source

    def count_rows(self) -> tuple[int | None, str]:
        from launcher import sizing

        return sizing.count_rows(self.cfg)

    def metadata(self) -> dict:
        d = self.cfg.data
        return {"random_base": self.random_init(), "task": self.name, "prompt_template": d.prompt_template, "prompt_template_no_input": d.prompt_template_no_input,
                "chat_turn_template": d.chat_turn_template, "prompt_format": self.prompt_format,
                "max_length": d.max_length}


def prompt_ids(prompt: str, data_cfg, tokenizer, chat: bool = False) -> list[int]:
    """The model's input for a bare prompt, in the run's format, up to where the answer starts:
    the tokenizer's chat template (with the generation prompt) when it has one, else our chat
    turn template for chat-trained runs, else the instruction template."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    elif chat:
        head, tail = data_cfg.chat_turn_template.split("{content}", 1)
        text = head.format(role="user") + prompt + tail.format(role="user") + head.format(role="assistant")
    else:
        text, _ = instructions.render({"instruction": prompt, "input": "", "output": ""}, data_cfg,
                                      type("T", (), {"eos_token": "", "chat_template": None}))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and not (tokenizer.bos_token and text.startswith(tokenizer.bos_token)):
        ids = [bos] + ids
    return ids


def load_exported(model_dir: str | Path):
    """(model, tokenizer, data config with the run's templates) from a causal-LM `model/` export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.config import DataConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model directory")
    meta = json.loads((model_dir / "launcher.json").read_text()) if (model_dir / "launcher.json").is_file() else {}
    d = DataConfig()
    for key in ("prompt_template", "prompt_template_no_input", "chat_turn_template", "max_length"):
        if key in meta:
            setattr(d, key, meta[key])
    model_dir_format = meta.get("prompt_format", "instruction")
    model = from_pretrained(AutoModelForCausalLM, str(model_dir)).to(inference_device()).eval()
    tokenizer = from_pretrained(AutoTokenizer, str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    d.prompt_format = model_dir_format  # read by `launcher generate`
    return model, tokenizer, d


def token_losses(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-token cross-entropy (0 where labels are ignored) in chunks of positions, each
    upcast to float32 on its own: the whole sequence x vocabulary never exists in float32
    (with a 152k vocabulary that is 2.5 GB per 1k tokens). For evaluation (no gradients)."""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[1], chunk):
        part = logits[:, start : start + chunk].float()
        out[:, start : start + chunk] = torch.nn.functional.cross_entropy(
            part.transpose(1, 2), labels[:, start : start + chunk], ignore_index=instructions.IGNORE, reduction="none")
    return out


@torch.no_grad()
def evaluate_rows(model, tokenizer, data_cfg, rows: list[dict], batch_size: int = 16) -> dict:
    """`launcher eval` for SFT data, one process: loss and perplexity over response tokens."""
    ids, labels, stats = instructions.encode_rows(rows, data_cfg, tokenizer)
    collate = instructions.LMCollator(tokenizer.pad_token_id, packed=False)
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(ids), batch_size):
        batch = collate([{"input_ids": x, "labels": y, "seq_lens": [len(x)]} for x, y in zip(ids[i : i + batch_size], labels[i : i + batch_size])])
        batch = {k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        total_loss += float(token_losses(logits[:, :-1], target).sum())
        total_tokens += int((target != instructions.IGNORE).sum())
    loss = total_loss / max(1, total_tokens)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(ids), "tokens": total_tokens,
            "truncated": stats.truncated, "dropped": stats.dropped}


@torch.no_grad()
def generate_batch(model, tokenizer, data_cfg, prompts: list[str], max_new_tokens: int, chat: bool = False,
                   device="cpu", synced_gpus=None, batch_size: int = 16) -> list[str]:
    """Greedy answers, prompts batched with left padding (so every answer starts at the same column)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [prompt_ids(p, data_cfg, tokenizer, chat) for p in prompts[i : i + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, use_cache=True, synced_gpus=synced_gpus)
        out += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in gen]
    return out


def generate(model, tokenizer, data_cfg, prompt: str, max_new_tokens: int, chat: bool = False) -> str:
    """Greedy answer to one prompt in the run's format, on the model's device."""
    return generate_batch(model, tokenizer, data_cfg, [prompt], max_new_tokens, chat=chat, device=model.device)[0]
