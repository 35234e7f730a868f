"""Generation-based evaluation of a causal LM: does the tuned model now answer correctly?

One forward pass per batch of validation rows does three jobs. Each row is laid out as its
prompt, left-padded to the batch's widest prompt, followed by its reference answer (right-
padded), exactly the tokens it was trained on:
- the response loss, over the answer tokens (what training minimises; loss and perplexity);
- the prompt's key/value cache, cut back to the prompt, from which
  - every candidate answer of a closed set is scored by its log-likelihood (the sum over its
    tokens and end-of-turn marker, as lm-evaluation-harness scores multiple choice), and
  - greedy decoding continues, one token per step, until every row has ended its turn.
So the prompt is computed once, and only the answer positions go through the output head.

A closed set: the training answers take at most 50 distinct values, each used twice on
average (a classification posed as generation). Greedy decoding under uncertainty favours the
most frequent single-token answer; the likelihood choice does not (shared/NOTES.md: 984 of
1002 greedy answers were the majority class). Scores, by row:
- exact_match: the greedy answer equals the reference after normalisation (lower case, no
  punctuation or articles, single spaces: SQuAD's);
- accuracy, macro_f1 (closed set): the greedy answer as a class (an answer outside the set
  counts against the reference's class and for none);
- choice_accuracy, choice_macro_f1, f1/<answer> (closed set): the most likely candidate.

Ranks share the rows (each evaluates its slice, padded with repeats so every rank runs as
many forward passes: under ZeRO-3 and FSDP2 every forward is a collective) and exchange
per-row results, so each row counts once.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

import torch

IGNORE = -100
CLOSED_SET_METRICS = ("accuracy", "macro_f1", "choice_accuracy", "choice_macro_f1")
EXTRA_TOKENS = 8  # greedy answers stop this many tokens past the longest reference


def _cache_name() -> str:
    """transformers 5.24 renamed the key/value cache argument and output `past_key_values` -> `cache`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def normalize(text: str) -> str:
    """Exact match's form (SQuAD's): case, punctuation and articles do not count; but an answer
    that is nothing else ("A" of A-D, "The") keeps them, or it would equal an empty reply."""
    text = text.lower()
    text = "".join(c for c in text if c not in set(string.punctuation))
    kept = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join((kept if kept.split() else text).split())


# ---------------------------------------------------------------- rows and batches


@dataclass
class Candidates:
    """A closed answer set and each answer's tokens as training renders them after a prompt."""

    answers: list[str]
    tokens: list[list[int]]

    @classmethod
    def build(cls, answers: list[str] | None, continuation) -> "Candidates | None":
        """continuation(answer) -> the ids training puts after the prompt (answer, end of turn)."""
        if not answers:
            return None
        return cls(list(answers), [continuation(a) for a in answers])


def answer_tokens(labels) -> int:
    """Tokens of the last answer in a row (labelled run at its end)."""
    from launcher.data.instructions import last_answer_start

    return len(labels) - last_answer_start(labels)


class EvalBatches:
    """This rank's share of evaluation rows, in batches of similar length.

    rows: dicts with input_ids, labels, answer, question (validation token rows); the first
    `generate_rows` of them (None: all) are also answered. Both groups are sorted by length and
    dealt to ranks in turn; a rank short of rows repeats its last one (index -1: not counted)."""

    def __init__(self, rows, rank: int, world: int, batch_size: int, pad_id: int, generate_rows: int | None = None):
        import numpy as np

        self.rows, self.pad_id, self.batch_size = rows, pad_id, batch_size
        n = len(rows)
        lengths = np.asarray(getattr(rows, "lengths", None) if getattr(rows, "lengths", None) is not None
                             else [len(r["input_ids"]) for r in rows])
        n_gen = n if generate_rows is None else min(n, generate_rows)
        self.groups = []
        for flag, idx in ((True, np.arange(n_gen)), (False, np.arange(n_gen, n))):
            if len(idx) == 0:
                continue
            order = idx[np.argsort(lengths[idx], kind="stable")]
            share = math.ceil(len(order) / world)
            mine = [int(i) for i in order[rank::world]]
            self.groups.append((flag, mine + [-1] * (share - len(mine)), int(order[0])))
        self.n_rows, self.n_generate = n, n_gen

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / self.batch_size) for _, m, _ in self.groups)

    def __iter__(self):
        for generate, mine, spare in self.groups:
            # A rank short of rows repeats its last one (or the group's first, when it has none).
            last = next((i for i in reversed(mine) if i >= 0), spare)
            for start in range(0, len(mine), self.batch_size):
                part = mine[start : start + self.batch_size]
                rows = [self.rows[i if i >= 0 else last] for i in part]
                yield collate(rows, part, self.pad_id, generate)


def collate(rows: list[dict], indices: list[int], pad_id: int, generate: bool) -> dict:
    """Prompts left-padded to one width W, then answers right-padded: column W is where every
    answer starts. A row without labels (a prompt to answer) has an empty answer part."""
    from launcher.data.instructions import last_answer_start

    splits = [last_answer_start(r["labels"]) if r.get("labels") is not None else len(r["input_ids"]) for r in rows]
    width = max(splits)
    tail = max(len(r["input_ids"]) - s for r, s in zip(rows, splits))
    n = len(rows)
    ids = torch.full((n, width + tail), pad_id, dtype=torch.long)
    labels = torch.full((n, width + tail), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, width + tail), dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, splits)):
        x = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        y = torch.as_tensor(list(r["labels"]), dtype=torch.long) if r.get("labels") is not None else torch.full_like(x, IGNORE)
        a = len(x) - s
        ids[i, width - s : width + a] = x
        labels[i, width - s : width + a] = y
        mask[i, width - s : width + a] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "width": width,
            "prompt_lens": torch.tensor(splits), "index": list(indices), "generate": generate,
            "answer": [r.get("answer") for r in rows], "question": [r.get("question") for r in rows]}


# ---------------------------------------------------------------- one batch


@torch.no_grad()
def run_batch(model, batch: dict, candidates: Candidates | None, stop_ids: set[int], max_new: int,
              sync=None, head=None, positions_limit: int | None = None) -> list[dict]:
    """Per row: index, loss sum and token count over its labels, and when the batch is answered,
    the greedy response ids and each candidate's log-likelihood. sync(flag) -> whether any rank
    still decodes (sharded engines); None: this process alone decides. head: a lean_loss.Head,
    which scores the labelled positions from the hidden states a chunk at a time (no batch x
    length x vocabulary logits); None: the model's own logits. positions_limit: the model's
    learned position table's size (models.position_limit), past which no token is fed."""
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    width, n = batch["width"], ids.shape[0]
    prompt_lens = batch["prompt_lens"].to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # The head runs only where it is needed: from the last prompt position on, when no label
    # lies inside the prompts (a single answer per row); else everywhere (multi-turn rows).
    single = bool((labels[:, :width] == IGNORE).all())
    keep = ids.shape[1] - width + 1 if single else 0
    answering = batch["generate"] and (candidates is not None or max_new > 0)
    kv = _cache_name()
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": answering}
    start = width - 1 if single else 0  # the first position whose prediction is scored
    if head is not None:
        from launcher.tasks import lean_loss

        out, hidden = lean_loss.forward_hidden(model, **inputs)
        losses = head.token_losses(hidden[:, start:-1], labels[:, start + 1 :])
        first_logits = head.logits(hidden[:, width - 1])
    else:
        out = model(**inputs, logits_to_keep=keep)
        logits = out.logits  # from column `start` on
        losses = _token_losses(logits[:, :-1], labels[:, start + 1 :])
        first_logits = logits[:, width - 1 - start]
    counted = labels[:, start + 1 :] != IGNORE
    results = [{"index": batch["index"][i], "loss": float(losses[i].sum()), "tokens": int(counted[i].sum())}
               for i in range(n)]
    if not answering:
        return results
    cache = _prompt_cache(model, getattr(out, kv), ids[:, :width], prompt_mask := mask[:, :width],
                          positions[:, :width], width, sync)
    first_logp = torch.log_softmax(first_logits.float(), -1)
    if candidates is not None:
        scores, cache = _candidate_scores(model, cache, first_logp, candidates, ids[:, :width], prompt_mask,
                                          positions[:, :width], prompt_lens, sync, positions_limit)
        for i in range(n):
            results[i]["scores"] = [float(s) for s in scores[i]]
            results[i]["choice"] = int(scores[i].argmax())
    generated = greedy(model, cache, first_logp.argmax(-1), prompt_mask, prompt_lens, stop_ids, max_new, sync,
                       positions_limit)
    for i in range(n):
        results[i]["response_ids"] = generated[i]
    return results


def _candidate_scores(model, cache, first_logp, candidates: Candidates, prompt_ids, prompt_mask, positions, prompt_lens,
                      sync=None, positions_limit: int | None = None):
    """(rows x candidates log-likelihoods, the prompt cache): each candidate's tokens fed after
    the prompts in one forward from the cache, which is cut back to the prompts after each."""
    device, n, width = first_logp.device, first_logp.shape[0], prompt_ids.shape[1]
    kv = _cache_name()
    scores = torch.zeros((n, len(candidates.answers)), dtype=torch.float64, device=device)
    for c, tokens in enumerate(candidates.tokens):
        scores[:, c] = first_logp[:, tokens[0]].double()
        if len(tokens) > 1:
            feed = torch.tensor(tokens[:-1], device=device).expand(n, -1)
            m = torch.cat([prompt_mask, torch.ones_like(feed)], 1)
            pos = prompt_lens[:, None] + torch.arange(len(tokens) - 1, device=device)
            # A candidate's tokens past the table's end are read at its last position: an
            # approximation, only for prompts within a candidate's length of the table's end.
            if positions_limit is not None:
                pos = pos.clamp(max=positions_limit - 1)
            step = model(input_ids=feed, attention_mask=m, position_ids=pos, use_cache=True, **{kv: cache})
            logp = torch.log_softmax(step.logits.float(), -1)
            target = torch.tensor(tokens[1:], device=device).expand(n, -1)
            scores[:, c] += logp.gather(-1, target[..., None])[..., 0].double().sum(1)
            cache = _prompt_cache(model, cache, prompt_ids, prompt_mask, positions, width, sync)
    return scores, cache


def _prompt_cache(model, cache, prompt_ids, prompt_mask, positions, width: int, sync=None):
    """The cache cut back to the prompts (their first `width` columns). Caches that cannot be cut
    (sliding-window layers past their window) are rebuilt from the prompts, on every rank when
    any rank must (`sync`): each rebuild is a forward pass, a collective under sharded engines."""
    extra = cache.get_seq_length() - width
    cut = extra == 0
    if not cut and getattr(cache, "is_croppable", False):
        try:
            cache.crop(-extra)  # transformers 5: a negative count removes that many positions
            cut = cache.get_seq_length() == width
        except (RuntimeError, ValueError):
            pass
    rebuild = not cut
    if sync is not None:
        rebuild = sync(rebuild)
    if not rebuild:
        return cache
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    return getattr(out, _cache_name())


def greedy(model, cache, first, prompt_mask, prompt_lens, stop_ids: set[int], max_new: int, sync=None,
           positions_limit: int | None = None) -> list[list[int]]:
    """Greedy continuation from a prompt cache: ids per row up to (not including) its stop token.
    Finished rows keep feeding their last token, so every row (and every rank, when `sync`
    says one still decodes) runs the same forward passes. With a learned position table
    (`positions_limit`), a row's answer ends where the table does: a model reads no token past
    it (GPT-2 at data.max_length = n_positions indexed outside it)."""
    device = first.device
    n = first.shape[0]
    stops = torch.tensor(sorted(stop_ids), device=device)
    out = [first]
    done = torch.isin(first, stops)
    length = torch.full((n,), max_new, device=device)  # tokens kept per row, before its stop token
    mask = prompt_mask
    for step in range(1, max_new):
        pos = (prompt_lens + step - 1)[:, None]
        if positions_limit is not None:
            full = (pos[:, 0] >= positions_limit) & ~done
            length.masked_fill_(full, step)
            done = done | full
            pos = pos.clamp(max=positions_limit - 1)  # finished rows' feed, whose outputs are dropped
        busy = bool((~done).any())
        if sync is not None:
            busy = sync(busy)
        if not busy:
            break
        token = out[-1]
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **{_cache_name(): cache}).logits[:, -1]
        nxt = torch.where(done, token, logits.argmax(-1))
        done = done | torch.isin(nxt, stops)
        out.append(nxt)
    seqs = torch.stack(out, 1).tolist()
    result = []
    for row, kept in zip(seqs, length.tolist()):
        row = row[:kept]
        cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        result.append(row[:cut])
    return result


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per-token cross-entropy (0 where ignored), upcast to float32 a chunk of positions at a time."""
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[1], chunk):
        part = logits[:, start : start + chunk].float()
        out[:, start : start + chunk] = torch.nn.functional.cross_entropy(
            part.transpose(1, 2), labels[:, start : start + chunk], ignore_index=IGNORE, reduction="none")
    return out


# ---------------------------------------------------------------- whole evaluations


@dataclass
class AnswerFrame:
    """What training puts around each answer (causal_lm.answer_frame): the text before it that
    a reply starts with (lead) and the token after it (end), where answers stop as at EOS."""

    lead: str = ""
    end: int | None = None

    def reply(self, text: str) -> str:
        text = text.strip()
        return text[len(self.lead):].strip() if self.lead and text.startswith(self.lead) else text


def evaluate(model, batches, tokenizer, candidates: Candidates | None, max_new: int, sync=None, gather=None,
             autocast=None, head=None, frame: AnswerFrame | None = None) -> tuple[dict, list[dict]]:
    """(metrics, one record per row in index order) over every rank's batches. gather(list) ->
    every rank's lists (a collective); autocast: the run's autocast context factory; head: see
    run_batch; frame: where answers stop and what they start with."""
    import contextlib

    from launcher.models import position_limit

    frame = frame or AnswerFrame()
    stop_ids = stop_token_ids(tokenizer, model) | ({frame.end} if frame.end is not None else set())
    limit = position_limit(model)
    records = []
    for batch in batches:
        with autocast() if autocast is not None else contextlib.nullcontext():
            results = run_batch(model, batch, candidates, stop_ids, max_new, sync, head, limit)
        for r, ans, q in zip(results, batch["answer"], batch["question"]):
            if r["index"] < 0:
                continue
            if "response_ids" in r:
                r["response"] = frame.reply(tokenizer.decode(r.pop("response_ids"), skip_special_tokens=True))
            r["reference"], r["question"] = ans, q
            records.append(r)
    if gather is not None:
        records = [r for part in gather(records) for r in part]
    by_index: dict = {}
    for r in records:
        by_index.setdefault(r["index"], r)
    rows = [by_index[i] for i in sorted(by_index)]
    return score(rows, candidates), rows


def stop_token_ids(tokenizer, model) -> set[int]:
    """Where an answer ends: the tokenizer's EOS and any the model's generation config names."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def score(rows: list[dict], candidates: Candidates | None) -> dict:
    total = sum(r["loss"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    loss = total / max(1, tokens)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "n": len(rows), "tokens": tokens}
    answered = [r for r in rows if "response" in r]
    if not answered:
        return out
    out["exact_match"] = sum(normalize(r["response"]) == normalize(r["reference"] or "") for r in answered) / len(answered)
    out["generated"] = len(answered)
    if candidates is None:
        return out
    names = candidates.answers
    # Answers that normalise alike ("Yes", "yes") are one class, as exact_match counts them:
    # a reply that matches its reference exactly was scored wrong as the other spelling.
    lookup = {normalize(a): a for a in names}
    truth = [lookup.get(normalize(r["reference"] or ""), r["reference"]) for r in answered]
    greedy_pred = [lookup.get(normalize(r["response"])) for r in answered]
    choice_pred = [lookup[normalize(names[r["choice"]])] for r in answered]
    for prefix, pred in (("", greedy_pred), ("choice_", choice_pred)):
        out[f"{prefix}accuracy"] = sum(p == t for p, t in zip(pred, truth)) / len(answered)
        per_class = class_f1(truth, pred, names)
        out[f"{prefix}macro_f1"] = sum(per_class.values()) / max(1, len(per_class))
        for name, value in per_class.items():
            out[f"{prefix}f1/{name}"] = value
    return out


def class_f1(truth: list, pred: list, names: list[str]) -> dict:
    """F1 per answer that occurs as a reference or a prediction (None predicts no class)."""
    out = {}
    for name in names:
        tp = sum(p == name and t == name for p, t in zip(pred, truth))
        fp = sum(p == name and t != name for p, t in zip(pred, truth))
        fn = sum(p != name and t == name for p, t in zip(pred, truth))
        if tp + fp + fn:
            out[name] = 2 * tp / (2 * tp + fp + fn)
    return out
