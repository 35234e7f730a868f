"""A WordPiece tokenizer built locally from the training texts (tiny models; no download).

The vocabulary is computed here rather than by `tokenizers`' WordPieceTrainer: that
trainer breaks frequency ties differently from one process to the next (seen:
two runs on identical data produced different vocabularies), and a run must be
reproducible from its config. Vocabulary = special tokens, every character seen
(alone and as a `##` continuation, so no word is ever unknown), then whole words
by descending count, ties alphabetical.
"""

from __future__ import annotations

import contextlib
from collections import Counter

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Causal LMs: like Llama's, no pad token (the task decides how to pad, and says so).
LM_SPECIAL = ["<unk>", "<s>", "</s>"]


def build_vocab(texts: list[str], vocab_size: int, normalize, pre_tokenize, special=SPECIAL) -> dict[str, int]:
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenize(normalize(text)))
    chars = sorted({c for w in words for c in w})
    tokens = list(special) + chars + ["##" + c for c in chars]
    seen = set(tokens)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return {t: i for i, t in enumerate(tokens)}


def _wordpiece(texts: list[str], vocab_size: int, special: list[str], unk: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    vocab = build_vocab(texts, vocab_size, normalizer.normalize_str, pre.pre_tokenize_str, special)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    return tok, vocab


def train_lm_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """For tiny causal LMs: <s> and </s>, no pad token, no chat template. It adds <s> before a
    text, as Llama's does: every training row starts with it (prompts.with_bos; launcher itself
    tokenizes without special tokens), so the export tokenizes a prompt as training did through
    plain transformers too (without it, plain `generate` saw prompts no row had trained)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok, vocab = _wordpiece(texts, vocab_size, LM_SPECIAL, "<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B:1",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=max_length)


def train_wordpiece(texts: list[str], vocab_size: int, max_length: int):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok, vocab = _wordpiece(texts, vocab_size, SPECIAL, "[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


@contextlib.contextmanager
def settings_kept(tokenizer):
    """A fast tokenizer called sets truncation and padding on its backend as the call asks (or
    clears them) and leaves them so: saved afterwards, tokenizer.json carried this run's
    max_length, which the tokenizers library applies to every text it encodes, where the file
    loaded had none (or lost a hub tokenizer's own), and two equal runs' exports differed by
    whether the process tokenized or read the token cache. Every launcher call that tokenizes
    goes through this: the backend is put back as loaded after it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer keeps no such state
        yield
        return
    truncation, padding = backend.truncation, backend.padding
    try:
        yield
    finally:
        backend.no_truncation()
        backend.no_padding()
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)
