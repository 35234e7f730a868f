"""Causal-LM instruction fine-tuning: tokenizer and pad policy, model, token-level loss,
evaluation (response loss and perplexity, greedy answers and closed-set choices scored against
the references: tasks/generation.py), sample generations, exported-model helpers.

Training sums token losses over a micro-batch's response tokens (labels -100 elsewhere);
the loop divides by the response tokens of the whole global batch. Evaluation sums token
losses and token counts over every row once, whichever rank evaluated it, so perplexity is
exp(total loss / total response tokens). Every row becomes text through data/prompts.py, in
training and in every answer after it, with the format this run recorded in launcher.json.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from launcher.config import TINY_MODEL, TaskConfig
from launcher.data import instructions, prompts
from launcher.data.prompts import PromptFormat
from launcher.data.tokenizer import settings_kept
from launcher.errors import ConfigError, DataError
from launcher.tasks import generation
from launcher import models
from launcher.models import from_config, from_pretrained, inference_device, pad_with_eos, remote_code_gate


def tiny_config(cfg: TaskConfig, vocab_size: int, tokenizer):
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

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        self.pad_note = ""
        self.new_note = ""  # LoRA's modules_to_save grown by what the load initialised (lora.new_note)
        self.fresh_note = ""  # else the weights the load initialised at random (models.new_weights_note)
        self.fmt = PromptFormat.from_config(cfg.data, None)  # completed by tokenizer() and datasets()
        self.answers: list[str] | None = None  # the closed answer set, when the answers form one
        self.candidates: generation.Candidates | None = None
        self.last_rows: list[dict] = []  # the latest evaluation's answers, row by row
        self._lean: bool | None = None  # the chunked loss (check_loss decides)
        self._lean_eval = False  # evaluation's lean head (where the head's weight is whole)
        self._attn: str | None = None  # attn()
        self.frame = generation.AnswerFrame()  # where answers stop and what they start with (answer_frame)
        self._said_generation_note = False  # engines.for_generation's line, printed at the first evaluation

    # ---- sources and data

    def check_model_source(self) -> None:
        if self.cfg.model.name != TINY_MODEL:
            from transformers import AutoConfig

            from launcher.models import gguf_source

            if self.cfg.model.quantization != "none" and gguf_source(self.cfg.model.name) is not None:
                raise ConfigError(f"model.quantization: {self.cfg.model.quantization} is not supported on a GGUF "
                                  "model.name yet; save the model as a directory once (transformers: from_pretrained "
                                  "with gguf_file, then save_pretrained) and name that")
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

        from launcher.data import pipeline

        if self.cfg.model.name != TINY_MODEL:
            tok = from_pretrained(AutoTokenizer, self.cfg.model.name, self.cfg.model)
        elif (saved_dir / "tokenizer.json").is_file():
            tok = pipeline.saved_tokenizer(saved_dir)
            recorded = models.export_meta(saved_dir).get("prompt")
            if isinstance(recorded, dict) and recorded.get("chat_template") is False:
                # a checkpoint's skeleton of a run that trained with the turn template: its
                # tokenizer got a template for outside readers (tokenizer_to_save); this run
                # renders as that one did
                tok.chat_template = None
        else:
            from launcher.data.tokenizer import train_lm_tokenizer

            class _Plain:  # render without special tokens: the tokenizer does not exist yet
                eos_token, chat_template = "", None

            plain = PromptFormat.from_config(self.cfg.data, _Plain)

            def train(source):
                texts = []
                for record in pipeline.first_rows(source, cache):
                    try:
                        texts.append(prompts.render(prompts.normalize(record, plain, ""), plain, _Plain)[0])
                    except DataError:
                        pass  # reported with its file:line when the rows are tokenized
                texts += self.cfg.eval.generation_prompts
                return train_lm_tokenizer(texts, self.cfg.model.tiny.vocab_size, self.cfg.data.max_length)

            d = self.cfg.data
            key = {"kind": "lm-wordpiece-bos", "vocab_size": self.cfg.model.tiny.vocab_size, "max_length": d.max_length,
                   "format": plain.to_json(), "prompts": self.cfg.eval.generation_prompts}
            tok = pipeline.tokenizer_from_cache(train_source, cache, key, train)
        if tok.eos_token_id is None:
            raise ConfigError(f"model.name: {self.cfg.model.name}: the tokenizer has no EOS token to end responses with")
        # Padded positions get attention 0 and label -100 while real EOS tokens keep their
        # labels (labels come from spans, not from token ids).
        self.pad_note = pad_with_eos(tok, "masked out of attention and loss")
        self.fmt = PromptFormat.from_config(self.cfg.data, tok)
        return tok

    def datasets(self, train_source, val_source, tokenizer, cache):
        """Token rows of both splits, checked, tokenized (and packed) once per cache, memory-mapped.
        Validation rows keep their reference answers and questions (generation-based evaluation).
        From the training rows: the prompt style for bare prompts (chat when most rows are
        conversations), the system prompt they share (recorded for generate and predict), and
        the closed answer set when the answers form one."""
        import dataclasses

        from launcher.data import pipeline
        from launcher.data.batching import tokenizer_fingerprint

        d = self.cfg.data

        def prepare(src, cfg, columns):
            encode = instructions.InstructionEncoder(cfg, tokenizer, self.fmt)
            key = {"task": self.name, "tokenizer": tokenizer_fingerprint(tokenizer),
                   "chat_template": getattr(tokenizer, "chat_template", None), "max_length": cfg.max_length,
                   "truncation": cfg.truncation, "packing": cfg.packing, "format": self.fmt.to_json(),
                   "max_rows_per_answer": cfg.max_rows_per_answer}
            split = pipeline.Split(src, encode, columns, key, check=encode.check, finish=encode.finish,
                                   check_columns=encode.check_columns)
            return pipeline.prepare(split, cache, d.num_proc)

        train_ds = prepare(train_source, d, ("input_ids", "labels", "seq_lens"))
        train = train_ds.meta["stats"]
        style = "chat" if train.get("chat_rows", 0) * 2 > train["rows"] else "instruction"
        system = self.fmt.system_prompt if self.fmt.system_prompt is not None else train.get("system_prompt")
        self.fmt = self.fmt.replace(style=style, system_prompt=system)
        # Validation in the format the export records (the training rows' shared system prompt
        # included), as `launcher eval`, `generate` and `predict` render it; never packed: loss
        # per example, and answers need single prompts.
        val_ds = prepare(val_source, dataclasses.replace(d, packing=False, max_rows_per_answer=None),
                         ("input_ids", "labels", "seq_lens", "answer", "question"))
        val = val_ds.meta["stats"]
        self._max_new = self.max_new_tokens(val_ds)  # recorded for predict (metadata)
        out = [train_ds, val_ds]
        self.answers = closed_set(train.get("answers"), val.get("answers"))
        self.candidates = generation.Candidates.build(self.answers, lambda a: continuation(a, self.fmt, tokenizer))
        self.frame = answer_frame(self.fmt, tokenizer)
        metric = self.cfg.eval.metric
        if metric in generation.CLOSED_SET_METRICS and self.answers is None:  # found now, not at the first evaluation
            raise DataError(f"eval.metric: {metric} needs a closed set of answers (at most "
                            f"{instructions.CLOSED_SET_MAX} distinct training answers, each used twice on average); "
                            "this data has none: use exact_match or loss")
        return tuple(out)

    def train_examples(self, train_ds) -> int:
        return instructions.EncodeStats(**train_ds.meta["stats"]).examples()

    def describe(self, train_ds, val_ds) -> tuple[list[str], dict]:
        d = self.cfg.data
        train_stats = instructions.EncodeStats(**train_ds.meta["stats"])
        val_stats = instructions.EncodeStats(**val_ds.meta["stats"])
        lines = [train_stats.line("train"), val_stats.line("validation")]
        derived: dict[str, float] = {"derived.train_truncated": train_stats.truncated, "derived.train_dropped": train_stats.dropped,
                                     "derived.train_unanswered": train_stats.unanswered,
                                     "derived.train_response_tokens": train_stats.label_tokens}
        if d.packing:
            eff = train_ds.packing_efficiency(d.max_length)
            greedy = train_stats.tokens / max(1, d.max_length * train_stats.blocks_greedy)
            lines.append(f"packing: {train_stats.examples()} examples in {len(train_ds)} blocks of "
                         f"{d.max_length} tokens (best-fit decreasing; in order: {train_stats.blocks_greedy}); "
                         f"efficiency {eff:.1%} (real tokens / block slots; in order: {greedy:.1%})")
            # derived.n_train counts examples, as unpacked; a step's global batch counts blocks
            derived["derived.n_train"] = train_stats.examples()
            derived["derived.n_train_blocks"] = len(train_ds)
            derived["derived.packing_efficiency"] = round(eff, 4)
            derived["derived.packing_efficiency_in_order"] = round(greedy, 4)
        if train_stats.capped:
            left = ", ".join(f"{n} of {(train_stats.answers or {}).get(a, '?')} rows answering {a!r}"
                             for a, n in sorted(train_stats.capped.items()))
            lines.append(f"data.max_rows_per_answer {d.max_rows_per_answer}: left out {left}")
            derived["derived.train_rows_left_out"] = sum(train_stats.capped.values())
        if train_stats.empty_answers:  # (trained without a word: the model learns to end its turn at once)
            lines.append(f"note: {train_stats.empty_answers} of {train_stats.rows - train_stats.dropped} training rows have "
                         "an empty answer: they teach the model to end its turn at once")
        if val_stats.empty_answers and self.cfg.eval.generate_rows != 0:  # (scored without a word, as `launcher eval` says)
            lines.append(f"note: {val_stats.empty_answers} of {val_stats.rows - val_stats.dropped} validation rows have an "
                         "empty reference: exact match counts only an empty reply right for them")
        if train_stats.control_text:  # (as a chat template renders them; said, since it is rarely meant)
            lines.append(f"note: {train_stats.control_text} of {train_stats.rows - train_stats.dropped} training rows hold the "
                         f"text of a special token in their own words ({train_stats.control_token} first): it is read as that "
                         "token, not as text (a chat template's rendering does the same); escape or drop it if it is meant as text")
            derived["derived.train_control_text"] = train_stats.control_text
        if self.answers:
            lines.append(f"closed answer set ({len(self.answers)}): {', '.join(self.answers)}; evaluation scores greedy "
                         "answers and the likeliest of these")
        if self.fmt.system_prompt is not None and self.cfg.data.system_prompt is None:
            lines.append(f"system prompt shared by every training row, recorded for generate and predict: "
                         f"{self.fmt.system_prompt!r}")
        lines += [note for note in (self.pad_note, self.new_note, self.fresh_note) if note]
        return lines, derived

    # ---- model and loss

    def attn(self) -> str:
        """The attention kernel for the class this run builds, decided once: the model and the
        collator (whether packed rows are flattened) must agree on it."""
        from transformers import AutoModelForCausalLM

        from launcher.tasks import modeling

        if self._attn is None:
            self._attn = modeling.attn_for(self.cfg, AutoModelForCausalLM)
        return self._attn

    def build_model(self, tokenizer, dtype: str = "float32"):
        from transformers import AutoModelForCausalLM

        from launcher.tasks import lora, modeling

        attn = self.attn()
        if self.cfg.model.name == TINY_MODEL:
            model = from_config(AutoModelForCausalLM, tiny_config(self.cfg, len(tokenizer), tokenizer), attn_implementation=attn)
        else:
            quantized = {}
            if self.cfg.model.quantization != "none":  # QLoRA: the frozen base in 4 or 8 bits (quantization.py)
                from launcher import quantization

                quantized = {"quantization_config": quantization.bnb_config(self.cfg.model.quantization, modeling.torch_dtype(dtype)),
                             "device_map": {"": quantization.load_device()}}
            model = from_pretrained(AutoModelForCausalLM, self.cfg.model.name, self.cfg.model, attn_implementation=attn,
                                    dtype=modeling.torch_dtype(dtype),
                                    output_loading_info=True,  # which weights are new: LoRA trains them whole (lora.apply)
                                    **quantized)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        model = modeling.finish(model, self.cfg, self.name, dtype)
        self.new_note = lora.new_note(model, self.cfg.model.name, self.name)
        # (said at a fresh start only: a resume's checkpoint restores them, see Trainer's setup)
        self.fresh_note = "" if self.new_note else models.new_weights_note(model, self.cfg.model.name)
        return model

    def collator(self, tokenizer):
        """Packed rows under flash attention are flattened into one padding-free row per
        micro-batch with the examples' boundaries (instructions.LMCollator): transformers finds
        packed examples from position ids alone only in a batch of one row."""
        flash = self.attn() == "flash_attention_2"
        return instructions.LMCollator(tokenizer.pad_token_id, self.cfg.data.packing,
                                       flatten=self.cfg.data.packing and flash)

    def prepare(self, train_ds, device) -> None:
        pass

    def loss_items(self, batch) -> float:
        """Response tokens that are predicted (labels shift by one)."""
        return float((batch["labels"][:, 1:] != instructions.IGNORE).sum())

    def row_items(self, train_ds) -> torch.Tensor:
        """Each row's predicted response tokens (instructions.response_items)."""
        return torch.from_numpy(instructions.response_items(train_ds.ds)).double()

    def check_loss(self, rt, model, val_ds) -> str | None:
        """Whether the chunked loss (and evaluation's lean head, where the head's weight is whole
        on every rank) stands in for the model's own loss and logits: compared once per attempt
        (lean_loss.self_check) on the first validation row with a label, before anything trains
        or evaluates. Every rank compares the same row with the same weights, so every rank
        decides alike. A line when not."""
        from launcher.tasks import lean_loss

        chunk = self.cfg.loss_chunk_tokens
        self._lean = self._lean_eval = False
        if not chunk:
            return None
        bare = rt.inference_model(model)
        batch = lean_loss.check_batch((val_ds[i] for i in range(min(len(val_ds), 64))), rt.device)

        def refusal(evaluation: bool) -> str | None:  # one rank's refusal stops all
            with rt.accelerator.autocast():
                why = (lean_loss.self_check(bare, batch, chunk, evaluation) if batch is not None
                       else lean_loss.NO_CHECK_ROW)
            return (why or "another rank's comparison failed") if rt.any_rank(why is not None) else None

        if why := refusal(evaluation=False):
            return f"train.loss_chunk_tokens: the chunked loss is off: {why}; the model's own loss is used"
        self._lean = True
        # Evaluation's head reads the decoder's hidden states and the head's weight outside the
        # model's forward (lean_loss.Head): where the weight is whole on every rank, and when
        # that too equals the model's own loss.
        if rt.any_rank(not lean_loss.whole_head(bare)):
            return None
        if why := refusal(evaluation=True):
            return f"train.loss_chunk_tokens: evaluation's lean head is off: {why}; evaluation uses the model's logits"
        self._lean_eval = True
        return None

    def loss_sum(self, model, batch) -> torch.Tensor:
        """Sum of token losses over the micro-batch's response tokens. Lean (tasks/lean_loss.py:
        the output head sums the losses of the labelled positions, a chunk at a time, inside
        the model's forward) unless train.loss_chunk_tokens is 0 or check_loss found it
        differs; else the model's own loss with num_items_in_batch=1 (its cross-entropy then
        sums instead of averaging)."""
        from launcher.tasks import lean_loss

        if self._lean is None:  # (not checked: a caller outside the trainer)
            self._lean = bool(self.cfg.loss_chunk_tokens) and lean_loss.supported(model)
        if self._lean:
            return lean_loss.loss_sum(model, batch, self.cfg.loss_chunk_tokens)
        return model(**batch, num_items_in_batch=_ONE).loss

    # ---- evaluation

    def eval_loader(self, rt, val_ds, batch_size: int, tokenizer):
        """This rank's share of the validation rows (generation.EvalBatches)."""
        self._tokenizer = tokenizer
        return generation.EvalBatches(val_ds, rt.rank, rt.world_size, batch_size, pad_id(tokenizer),
                                      self.cfg.eval.generate_rows)

    def max_new_tokens(self, val_ds) -> int:
        """Greedy answers stop EXTRA_TOKENS past the longest reference (a longer one cannot match
        any), or at eval.max_new_tokens."""
        longest = max((generation.answer_tokens(labels) for labels in val_ds.ds["labels"]), default=0)
        return min(self.cfg.eval.max_new_tokens, longest + generation.EXTRA_TOKENS)

    @torch.no_grad()
    def evaluate(self, rt, model, loader) -> dict:
        """Response loss and perplexity over every validation row; greedy answers and closed-set
        choices for the answered rows, scored against their references (tasks/generation.py)."""
        model.eval()
        from launcher.tasks import lean_loss

        with self._generating(rt, model) as (unwrapped, sync):
            metrics, self.last_rows = generation.evaluate(
                unwrapped, loader, self._tokenizer, self.candidates, self._max_new, sync=sync,
                gather=rt.gather_objects if rt.world_size > 1 else None, autocast=rt.accelerator.autocast,
                head=lean_loss.Head(unwrapped, self.cfg.loss_chunk_tokens) if self._lean_eval else None,
                frame=self.frame)
        model.train()
        return metrics

    @torch.no_grad()
    def tune(self, rt, model, loader, outputs=None) -> None:
        """No decision rule to tune for a language model."""
        return None

    def eval_outputs(self) -> None:
        return None

    def eval_outputs_needed(self) -> bool:
        return False

    @contextlib.contextmanager
    def _generating(self, rt, model):
        """(the module to run, generation's `sync`) for evaluation and samples, as the engine
        wants them (engines.for_generation); its one line printed the first time."""
        from launcher import engines

        with engines.for_generation(rt.engine, model, rt.inference_model(model), rt.device, rt.any_rank) as (unwrapped, lockstep, note):
            if note and not self._said_generation_note:
                rt.print(note)
                self._said_generation_note = True
            yield unwrapped, _sync(rt, lockstep)

    def samples(self, rt, model, tokenizer) -> list[dict]:
        """Greedy answers to eval.generation_prompts (every rank answers all of them: under
        sharded engines each forward is a collective; rank 0 logs them); without configured
        prompts, the first validation rows' answers from the evaluation that just ran."""
        prompts_ = self.cfg.eval.generation_prompts
        if not prompts_:
            return [{"prompt": r["question"], "response": r["response"], "reference": r["reference"]}
                    for r in self.last_rows if "response" in r][:SAMPLE_ROWS]
        model.eval()
        with self._generating(rt, model) as (unwrapped, sync), rt.accelerator.autocast():
            responses = answer_prompts(unwrapped, tokenizer, self.fmt, prompts_, self.cfg.eval.max_new_tokens, sync=sync)
        model.train()
        return [{"prompt": p, "response": r} for p, r in zip(prompts_, responses)]

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
            model = from_config(AutoModelForCausalLM, config)
        return sum(p.numel() for p in model.parameters()), source

    def count_rows(self) -> tuple[int | None, str]:
        from launcher import sizing

        return sizing.count_rows(self.cfg.task, self.cfg.data)

    def metadata(self) -> dict:
        """launcher.json: the prompt format every later answer renders with, the closed answer
        set (predict scores its candidates), the training max_length and what it did to a longer
        row (truncation: `launcher eval` does the same), and which loss trained it (train_loss:
        "chunked", or the "model"'s own)."""
        q = self.cfg.model.quantization  # the adapter/ of a QLoRA run trained on this quantized base
        return ({"random_base": self.random_init(), "task": self.name, "prompt": self.fmt.to_json(),
                "answers": self.answers, "max_length": self.cfg.data.max_length, "truncation": self.cfg.data.truncation,
                "max_new_tokens": self.cfg.eval.max_new_tokens,
                # where the run's evaluation answers stopped (max_new_tokens): predict's rows stop there too
                "answer_max_new_tokens": getattr(self, "_max_new", None),
                "train_loss": None if self._lean is None else "chunked" if self._lean else "model"}
                | ({"base_quantization": q} if q != "none" else {}))

    def tokenizer_to_save(self, tokenizer):
        """A run that trained on conversations without a chat template (data.chat_turn_template)
        writes one that renders them so (prompts.chat_template_of), so that plain transformers'
        apply_chat_template asks the export as training did (it raised: no template). launcher's
        own commands read the format from launcher.json, as before; a run started from one of
        this run's checkpoints drops it again (tokenizer())."""
        if self.fmt.chat_template or self.fmt.style != "chat":
            return tokenizer
        import copy

        try:
            saved = copy.deepcopy(tokenizer)
        except Exception as e:  # noqa: BLE001 - a tokenizer that cannot be copied (remote code): saved as it is
            print(f"warning: the export's tokenizer gets no chat template ({type(e).__name__}: it cannot be copied); "
                  "launcher's commands read the turn template from launcher.json", file=sys.stderr)
            return tokenizer
        saved.chat_template = prompts.chat_template_of(self.fmt, tokenizer)
        return saved


SAMPLE_ROWS = 3  # validation rows shown as sample generations when no prompts are configured


def _sync(rt, lockstep: bool):
    """generation's `sync`: whether any rank is still busy (a collective), when forwards are
    collectives and every rank must run as many (engines.for_generation)."""
    return (lambda busy: rt.any_rank(busy)) if lockstep else None


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def closed_set(train: dict | None, val: dict | None) -> list[str] | None:
    """The candidate answers when training answers form a closed set: at most CLOSED_SET_MAX
    distinct values, each used twice on average (a classification posed as generation); the
    validation references join them. None for free-form answers."""
    if not train or sum(train.values()) < 2 * len(train):
        return None
    names = sorted((set(train) | set(val or {})) - {""})
    return names if 1 < len(names) <= instructions.CLOSED_SET_MAX else None


def continuation(answer: str, fmt: PromptFormat, tokenizer) -> list[int]:
    """The ids training puts after a prompt for this answer: the answer and its end-of-turn."""
    ids, labels = instructions.encode(_probe(answer, fmt), fmt, tokenizer)
    return ids[instructions.last_answer_start(labels):]


def _probe(answer: str, fmt: PromptFormat) -> dict:
    """A one-question row answered `answer`, in the shape the run's rows render in."""
    if fmt.chat_template or fmt.style != "chat":
        return {"instruction": "?", "input": "", "output": answer}
    return {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": answer}]}


def answer_frame(fmt: PromptFormat, tokenizer) -> generation.AnswerFrame:
    """What training puts around each answer, from one probe answer rendered as training does:
    - end: the first special token after it, the chat template's end of turn (<|im_end|>,
      <|eot_id|>) or EOS. Generation stops there as at EOS: a base model's EOS (Qwen2.5's
      <|endoftext|>, Llama-3's <|end_of_text|>) is not what its template ends a turn with, and
      answers ran on into the next turn's header. Special tokens before the answer (gpt-oss's
      channel markers) are not it.
    - lead: the text the template puts between the generation prompt and the answer, as a reply
      decodes it (Qwen3's empty <think> block, whose tags are not special tokens): the model
      writes it first, and a reply is scored without it."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    probe = "probe answer"
    text, spans = prompts.render(_probe(probe, fmt), fmt, tokenizer)
    start = text.index(probe, spans[-1][0])
    with settings_kept(tokenizer):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        lead_ids = tokenizer(text[spans[-1][0]:start], add_special_tokens=False)["input_ids"]
    end = next((i for i, (a, _) in zip(enc["input_ids"], enc["offset_mapping"]) if a >= start + len(probe) and i in special), None)
    return generation.AnswerFrame(lead=tokenizer.decode(lead_ids, skip_special_tokens=True).strip(), end=end)


def prompt_rows(records: list[dict], fmt: PromptFormat, tokenizer, max_length: int | None = None,
                cut: list[int] | None = None) -> list[dict]:
    """Rows to answer (no reference needed): ids of each row's prompt, rendered as training did.
    A prompt longer than max_length (asked for, or the model's positions) keeps its end: the
    question and the marker after which the answer starts (its index goes into `cut`)."""
    out = []
    for i, row in enumerate(records):
        ids = prompts.prompt_ids(row, fmt, tokenizer, bare=row.get("_bare", False))
        if max_length and len(ids) > max_length:
            ids = ids[-max_length:]
            if cut is not None:
                cut.append(i)
        out.append({"input_ids": ids, "labels": None, "answer": prompts.answer(row) if "messages" in row or row.get("output") else None,
                    "question": prompts.question(row)})
    return out


def prompt_limit(model, max_new_tokens: int) -> int | None:
    """The longest prompt (in tokens, its end kept) that `generate` and `predict` feed a model: with
    a learned position table (GPT-2's), the table less the answer's room; None (uncut) with rotary
    or relative positions, which read any length (past their trained length, less well)."""
    from launcher.models import position_limit

    limit = position_limit(model)
    return max(1, limit - max_new_tokens) if limit is not None else None


def long_prompts_note(lengths: list[int], meta: dict, model, max_new_tokens: int) -> str | None:
    """A note on prompts that reach the run's data.max_length (launcher.json's; a row that long
    had no room left for an answer, so the model never trained on one), or whose answer runs
    past its config's max_position_embeddings (rotary and relative positions read them, less
    well; a learned table has cut them already): `generate` and `predict` answered them without
    a word. None when every prompt fits."""
    trained = meta.get("max_length") if isinstance(meta.get("max_length"), int) else None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    positions = getattr(config, "max_position_embeddings", None)
    longer = sum(n >= trained for n in lengths) if trained else 0
    past = sum(n + max_new_tokens > positions for n in lengths) if isinstance(positions, int) else 0
    if not longer and not past:
        return None
    reach = f"as long as the run's data.max_length ({trained}) or longer: no row it trained on had an answer past it"
    runs = f"past the model's max_position_embeddings ({positions})"
    if len(lengths) == 1:
        said = [f"is {reach}"] if longer else []
        said += [f"with {max_new_tokens} new tokens runs {runs}"] if past else []
        return f"note: the prompt ({lengths[0]} tokens) {', and '.join(said)}: it is answered, less reliably"
    said = [f"{longer} of {len(lengths)} prompts are {reach}"] if longer else []
    said += [f"{past} of {len(lengths)} prompts run {runs} with {max_new_tokens} new tokens"] if past else []
    return f"note: {'; '.join(said)}: they are answered, less reliably"


@torch.no_grad()
def answer_prompts(model, tokenizer, fmt: PromptFormat, texts: list[str], max_new_tokens: int, sync=None,
                   batch_size: int = 16, lengths: list[int] | None = None, cut: list[int] | None = None) -> list[str]:
    """Greedy answers to typed prompts (eval.generation_prompts, `launcher generate`), batched: each
    fills data.prompt's one column as predict's plain lines do, else is the instruction. With
    a learned position table (GPT-2's), a prompt keeps the end that leaves the answer room, as
    predict's do. `lengths` gets each prompt's tokens as answered, `cut` the index of each cut."""
    rows = prompt_rows([prompts.typed_row(t, fmt, "prompt") for t in texts], fmt, tokenizer, prompt_limit(model, max_new_tokens),
                       cut)
    if lengths is not None:
        lengths += [len(r["input_ids"]) for r in rows]
    batches = generation.EvalBatches(rows, 0, 1, batch_size, pad_id(tokenizer))
    _, answered = generation.evaluate(model, batches, tokenizer, None, max_new_tokens, sync=sync,
                                      frame=answer_frame(fmt, tokenizer))
    return [r["response"] for r in answered]


def load_exported(model_dir: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer, prompt format, launcher.json) from a causal-LM `model/` export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(models.not_a_model_dir(model_dir))
    meta = models.export_meta(model_dir)
    code = remote_code_gate(model_dir, trust_remote_code)
    model = models.exported(AutoModelForCausalLM, str(model_dir), output_loading_info=True, **code)
    models.warn_new_weights(model, str(model_dir))  # (an untied head left out of the folder's weights)
    model = model.to(inference_device()).eval()
    tokenizer = models.exported(AutoTokenizer, str(model_dir), **code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = PromptFormat.from_json(meta)
    if not meta:  # a plain folder (transformers' or a GGUF's): as training with it renders rows, through its
        from launcher.config import DataConfig  # chat template when it has one (it answered in Alpaca's frame)

        fmt = PromptFormat.from_config(DataConfig(), tokenizer)
    elif "prompt" not in meta:  # an export from before the format was recorded: its chat template
        # rendered conversations, and bare prompts only when the run had trained on conversations
        fmt = fmt.replace(chat_template=bool(getattr(tokenizer, "chat_template", None)) and fmt.style == "chat")
    return model, tokenizer, fmt, meta


def exported_candidates(meta: dict, fmt: PromptFormat, tokenizer) -> generation.Candidates | None:
    return generation.Candidates.build(meta.get("answers"), lambda a: continuation(a, fmt, tokenizer))


EVAL_CHUNK_TOKENS = 256  # `launcher eval`'s head chunk (train.loss_chunk_tokens's default)


@torch.no_grad()
def evaluate_rows(model, tokenizer, fmt: PromptFormat, rows: list[dict], max_length: int, candidates,
                  max_new_tokens: int, batch_size: int = 16, truncation: str = "truncate",
                  notes: list[str] | None = None) -> dict:
    """`launcher eval` for SFT data, one process: the training run's evaluation (loss, perplexity,
    exact match, closed-set scores) on any rows with references; `notes` gets a line counting
    the empty references, and one counting those outside the model's closed answer set."""
    from launcher.config import DataConfig

    kept: list[dict] = []
    ids, labels, stats = instructions.encode_rows(rows, DataConfig(max_length=max_length, truncation=truncation),  # type: ignore[arg-type]
                                                  tokenizer, fmt, kept)
    eval_rows = [{"input_ids": x, "labels": y, "answer": prompts.answer(r) or "", "question": prompts.question(r, scored=True)}
                 for x, y, r in zip(ids, labels, kept)]
    if not eval_rows:  # (scored, nothing reads as a loss of 0 and a perplexity of 1)
        raise DataError(f"--data: no row left to evaluate: all {stats.rows} dropped (longer than max_length {max_length} "
                        f"with data.truncation={truncation}, or no answer to score)")
    empty = sum(not r["answer"].strip() for r in eval_rows)
    if empty and notes is not None:  # (scored without a word: only an empty reply matches them)
        notes.append(f"note: {empty} of {len(eval_rows)} references are empty: exact match counts only an "
                     "empty reply right for them")
    if candidates is not None and notes is not None:  # (scored without a word: no choice can be right for them)
        known = {generation.normalize(a) for a in candidates.answers}
        odd = [r["answer"] for r in eval_rows if generation.normalize(r["answer"]) not in known and r["answer"].strip()]
        if odd:
            notes.append(f"note: {len(odd)} of {len(eval_rows)} references are none of the model's {len(known)} answers "
                         f"({odd[0]!r} first): no choice can match them, and each counts against choice_accuracy")
    longest = max((generation.answer_tokens(y) for y in labels), default=0)
    batches = generation.EvalBatches(eval_rows, 0, 1, batch_size, pad_id(tokenizer))
    from launcher.tasks import lean_loss

    check = lean_loss.check_batch(eval_rows, next(model.parameters()).device)
    head, _ = lean_loss.eval_head(model, EVAL_CHUNK_TOKENS, check)
    metrics, _ = generation.evaluate(model, batches, tokenizer, candidates,
                                     min(max_new_tokens, longest + generation.EXTRA_TOKENS), head=head,
                                     frame=answer_frame(fmt, tokenizer))
    return metrics | {"truncated": stats.truncated, "dropped": stats.dropped}


def generate(model, tokenizer, fmt: PromptFormat, prompt: str, max_new_tokens: int,
             lengths: list[int] | None = None, cut: list[int] | None = None) -> str:
    """Greedy answer to one prompt in the run's format, on the model's device."""
    return answer_prompts(model, tokenizer, fmt, [prompt], max_new_tokens, lengths=lengths, cut=cut)[0]
