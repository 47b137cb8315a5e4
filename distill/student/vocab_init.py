"""A student with another vocabulary starts from the teacher's embeddings (#24 item 4): each
student token's text, tokenised by the teacher, gets the mean of those teacher rows; a special
(added) token gets its teacher counterpart with the same content, else the mean row."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distill.student.xtok_terms import token_keys


def teacher_pieces(teacher_tok: Any, student_tok: Any) -> list[list[int] | None]:
    """Per student id, the teacher ids whose rows it starts from; None: the mean row."""
    t_added = {t.content: int(i) for i, t in teacher_tok.added_tokens_decoder.items()}
    out: list[list[int] | None] = []
    for k in token_keys(student_tok):
        if k is None:
            out.append(None)
            continue
        kind, raw = k
        if kind == "added":
            hit = t_added.get(raw.decode())
            out.append([hit] if hit is not None else None)
            continue
        text = raw.decode("utf-8", errors="ignore")  # a partial character: its whole bytes' text
        ids = teacher_tok(text, add_special_tokens=False)["input_ids"] if text else []
        out.append(list(ids) or None)
    return out


def transfer_embeddings(teacher_rows: Tensor, teacher_tok: Any, student_tok: Any) -> Tensor:
    """``[len(student_tok), H]``: each student token's teacher rows averaged
    (:func:`teacher_pieces`); teacher_rows [V_t, H] (an embedding or an LM head)."""
    mean = teacher_rows.mean(0)
    rows = []
    for ids in teacher_pieces(teacher_tok, student_tok):
        rows.append(teacher_rows[ids].mean(0) if ids else mean)
    return torch.stack(rows)
