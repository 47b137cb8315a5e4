"""Evaluation on a held-out shard set: sparse KD loss, CE and teacher top-1 agreement."""

from __future__ import annotations

from typing import Any

import torch

from distill.student.loader import ShardLoader
from distill.student.losses import eval_metrics


@torch.no_grad()
def evaluate(model: Any, loader: ShardLoader, chunk: int = 1024) -> dict[str, float]:
    """Means over all held-out target tokens: ``kd``, ``ce`` and ``top1_agreement``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weight = model.get_output_embeddings().weight
    tot = {"kd": 0.0, "ce": 0.0, "agree": 0.0, "rows": 0.0}
    for batch in loader.batches():
        b = batch.to(str(device))
        hidden = model.base_model(
            input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False
        ).last_hidden_state
        m = eval_metrics(
            hidden[b.target_mask],
            weight,
            b.t_ids,
            b.t_logprobs,
            b.labels,
            chunk,
            tail=loader.manifest.tail,
        )
        for k in tot:
            tot[k] += m[k]
    model.train(was_training)
    n = max(tot["rows"], 1.0)
    return {
        "kd": tot["kd"] / n,
        "ce": tot["ce"] / n,
        "top1_agreement": tot["agree"] / n,
        "target_tokens": tot["rows"],
    }


@torch.no_grad()
def generate_answer(model: Any, tokenizer: Any, question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to one user message, rendered with the chat template."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    device = next(model.parameters()).device
    out = model.generate(
        **{k: v.to(device) for k, v in enc.items()},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
