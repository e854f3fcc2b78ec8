"""Peer for the engine bench on a GPU: Hugging Face transformers greedy generation of the
same model directory, same prompt/new-token lengths and batches, tokens/s as JSON.

    python3 scripts/oracle/hf_generate_bench.py MODEL_DIR [--device cuda] [--dtype float16]
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

PROMPT, NEW = 200, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 8, 32):
        ids = torch.randint(10, vocab, (batch, PROMPT), generator=gen).to(a.device)
        mask = torch.ones_like(ids)
        kwargs = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids[:, :16], **{**kwargs, "attention_mask": mask[:, :16], "max_new_tokens": 4,
                                           "min_new_tokens": 4})  # warm-up
            torch.cuda.synchronize() if a.device == "cuda" else None
            t = time.perf_counter()
            out = model.generate(ids, **kwargs)
            torch.cuda.synchronize() if a.device == "cuda" else None
            seconds = time.perf_counter() - t
        tokens = (out.shape[1] - PROMPT) * batch
        rows.append({"batch": batch, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds})
    print(json.dumps({"peer": "transformers", "version": __import__("transformers").__version__,
                      "device": a.device, "dtype": a.dtype, "batches": rows}, indent=2))


if __name__ == "__main__":
    main()
