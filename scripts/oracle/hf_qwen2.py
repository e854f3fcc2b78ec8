#!/usr/bin/env python3
"""Hugging Face `transformers` as an oracle for our Qwen2 (not part of `make test`).

    python scripts/oracle/hf_qwen2.py make DIR    # tiny random Qwen2ForCausalLM checkpoints + expected outputs
    cargo test -p alignx-trainer --test hf_parity -- --ignored   # with ALIGNX_HF_ORACLE_DIR=DIR
    python scripts/oracle/hf_qwen2.py check DIR   # load the checkpoints *we* wrote; compare logits

`make` writes DIR/hf_{tied,untied}/ (model dirs as transformers saves them) with
expected.safetensors holding input_ids, logits and a greedy continuation. Our test loads
those, compares, and writes DIR/ours_{tied,untied}/ plus our logits; `check` loads ours in
transformers as Qwen2ForCausalLM and compares. Needs: pip install torch transformers.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

CASES = {"tied": True, "untied": False}
PROMPT = [[1, 5, 17, 3, 42, 9, 60, 11, 23, 7]]
NEW_TOKENS = 12


def make(root: Path) -> None:
    for name, tied in CASES.items():
        torch.manual_seed(7 if tied else 8)
        config = Qwen2Config(
            vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=tied,
            bos_token_id=1, eos_token_id=2,
        )
        model = Qwen2ForCausalLM(config).eval()
        out = root / f"hf_{name}"
        # The untied model is saved in shards, so the sharded (index.json) path is exercised.
        model.save_pretrained(out, max_shard_size="1GB" if tied else "100KB")
        ids = torch.tensor(PROMPT)
        with torch.no_grad():
            logits = model(ids).logits.float()
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=0)
        save_file({"input_ids": ids, "logits": logits.contiguous(),
                   "generated": gen[:, ids.shape[1]:].contiguous()}, out / "expected.safetensors")
        print(f"{out}: config keys {sorted(json.loads((out / 'config.json').read_text()))[:6]}…")


def check(root: Path) -> None:
    worst = 0.0
    for name in CASES:
        ours = root / f"ours_{name}"
        model = Qwen2ForCausalLM.from_pretrained(ours).eval()
        expected = load_file(ours / "expected.safetensors")
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits.float()
        diff = (logits - expected["logits"]).abs().max().item()
        worst = max(worst, diff)
        print(f"{ours}: transformers loads it as {type(model).__name__}; max |logit diff| vs ours = {diff:.3g}")
    if worst > 1e-4:
        sys.exit(f"logits differ by {worst}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit(__doc__)
    root = Path(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    {"make": make, "check": check}[sys.argv[1]](root)
