"""How conservative the openai backend's token estimate is (pas.llm.base.estimate_tokens): exact prompt
tokens (chat template, the model's tokenizer) vs the estimate, for the L1 answers and the full L2
prompts (history + expansion prompt) of a concepts run's transcripts.

    PYTHONPATH=src python benchmarks/token_estimate.py --transcripts data/concepts/transcripts.jsonl \
        --tokenizer models/llm/smollm2 [--tokenizer other/folder ...]

A ratio estimate/exact ≥ 1 means the estimate over-counts, so a budgeted prompt fits.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transcripts", default="data/concepts/transcripts.jsonl")
    ap.add_argument("--tokenizer", nargs="+", default=["models/llm/smollm2"])
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from pas.llm.base import estimate_tokens

    rows = [json.loads(line) for line in open(args.transcripts, encoding="utf-8")]
    gen = [r for r in rows if r["step"] == "generate" and r.get("used") and r["text"]]
    history = []
    for r in gen:
        history += r["messages"] + [{"role": "assistant", "content": r["text"]}]
    l2 = [history + [{"role": "user", "content": r["prompt"]}] for r in rows if r["step"] == "expand"]
    for name in args.tokenizer:
        tok = AutoTokenizer.from_pretrained(name)

        def exact(msgs):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return len(tok.encode(text, add_special_tokens=False))

        answers = [r["text"] for r in gen]
        per_answer = [len(a.encode()) / max(1, len(tok.encode(a, add_special_tokens=False))) for a in answers]
        ratios = [estimate_tokens(m) / exact(m) for m in l2]
        print(json.dumps({"tokenizer": name, "l1_answers": len(answers),
                          "bytes_per_token_mean": round(sum(len(a.encode()) for a in answers)
                                                        / sum(len(tok.encode(a, add_special_tokens=False))
                                                              for a in answers), 2),
                          "bytes_per_token_min": round(min(per_answer), 2), "l2_prompts": len(l2),
                          "l2_exact_tokens_max": max(map(exact, l2)) if l2 else None,
                          "estimate_over_exact_min": round(min(ratios), 2) if ratios else None,
                          "estimate_over_exact_max": round(max(ratios), 2) if ratios else None}))


if __name__ == "__main__":
    main()
