"""The plain `datasets` pipeline the data-scale benchmark compares launcher with: what a
hand-written Accelerate script does. Rank 0 first: load_dataset("json") and
map(batched=True, num_proc=N) into datasets' cache, the other ranks then read that cache;
a shuffled DataLoader with dynamic padding; the same tiny model; one optimizer step."""

import argparse
import time

started = time.time()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--task", choices=["clause", "sft"], default="clause")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--num-proc", type=int, default=2)
    a = p.parse_args()

    import datasets
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    datasets.disable_progress_bars()
    state = PartialState(cpu=True)
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def clause(batch):
        enc = tok(batch["text"], truncation=True, max_length=a.max_length)
        enc["label"] = [int(bool(x)) for x in batch["labels"]]
        return enc

    def sft(batch):
        texts = []
        for ins, out, msgs in zip(batch.get("instruction", [None] * len(batch["messages"])), batch.get("output", [None] * len(batch["messages"])), batch["messages"]):
            if msgs:
                texts.append("".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs) + tok.eos_token)
            else:
                texts.append(f"### Instruction:\n{ins}\n\n### Response:\n{out}{tok.eos_token}")
        enc = tok(texts, truncation=True, max_length=a.max_length)
        enc["labels"] = [list(x) for x in enc["input_ids"]]
        return enc

    with state.main_process_first():
        ds = datasets.load_dataset("json", data_files=a.train, split="train", cache_dir=a.cache)
        ds = ds.map(clause if a.task == "clause" else sft, batched=True, num_proc=a.num_proc, remove_columns=ds.column_names)
    ds = ds.shard(state.num_processes, state.process_index)
    if a.task == "clause":
        from transformers import DataCollatorWithPadding

        collate = DataCollatorWithPadding(tok)
        model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=128, num_labels=2))
    else:
        from transformers import DataCollatorForSeq2Seq

        collate = DataCollatorForSeq2Seq(tok)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=128, max_position_embeddings=a.max_length))
    loader = torch.utils.data.DataLoader(ds, batch_size=a.micro_batch, shuffle=True, collate_fn=collate, num_workers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = next(iter(loader))
    model(**batch).loss.backward()
    opt.step()
    if state.is_main_process:
        print(f"first optimizer step done {time.time() - started:.1f} s after start", flush=True)
    state.wait_for_everyone()


if __name__ == "__main__":
    main()
