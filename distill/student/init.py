"""Student: initialise it (a subset of the teacher's layers, or a pretrained model) and check
that it speaks the teacher's vocabulary."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from distill import models
from distill.config import Job
from distill.errors import DistillError
from distill.format.manifest import Manifest

_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


def select_layers(total: int, keep: int, how: str = "ends") -> list[int]:
    """Teacher layer indices for a ``keep``-layer student.

    ``ends`` keeps the first ``keep // 2`` and the last ``keep - keep // 2`` layers (dropping
    the middle); ``spaced`` spreads them evenly. On SmolLM2-135M-Instruct at 12 of 30 layers,
    before any training, ``ends`` gives a held-out sparse KD of 6.4 against 11.0 for
    ``spaced`` (measured on the demo eval split).
    """
    if keep >= total:
        return list(range(total))
    if how == "spaced":
        return spaced_layers(total, keep)
    head = keep // 2
    return list(range(head)) + list(range(total - (keep - head), total))


def spaced_layers(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``total``, always the first and the last."""
    if keep >= total:
        return list(range(total))
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def init_from_teacher_layers(
    teacher_dir: Path, keep: int, dest: Path, how: str = "ends", tokenizer_dir: Path | None = None
) -> Path:
    """Build a student from ``keep`` of the teacher's layers; save it (with tokenizer).

    ``tokenizer_dir``: the student's own tokenizer (another vocabulary); its embeddings and LM
    head are then :func:`~distill.student.vocab_init.transfer_embeddings` of the teacher's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = models.load_model(teacher_dir, "float32", "cpu")
    total = teacher.config.num_hidden_layers
    idx = select_layers(total, keep, how)
    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = len(idx)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in idx]
    tokenizer = models.load_tokenizer(tokenizer_dir or teacher_dir)
    t_in = teacher.get_input_embeddings().weight
    t_out = teacher.get_output_embeddings().weight
    vocab_tables = {t_in.data_ptr(), t_out.data_ptr()} if tokenizer_dir else set()
    if tokenizer_dir:
        config.vocab_size = len(tokenizer)
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, attr, getattr(tokenizer, attr, None))
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id
    student = AutoModelForCausalLM.from_config(config)
    new_of_old = {old: new for new, old in enumerate(idx)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        m = _LAYER.search(name)
        if tensor.data_ptr() in vocab_tables:
            continue  # the teacher's vocabulary: transferred below
        if m is None:
            state[name] = tensor
        elif int(m.group(2)) in new_of_old:
            new = new_of_old[int(m.group(2))]
            state[name[: m.start(2)] + str(new) + name[m.end(2) :]] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to embeddings
    if tokenizer_dir:
        missing = [k for k in missing if "embed_tokens" not in k]
    if missing or unexpected:
        raise DistillError(
            f"cannot build a layer-subset student from {teacher_dir}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (use student.init = 'pretrained')"
        )
    if tokenizer_dir:
        from distill.student.vocab_init import transfer_embeddings

        t_tok = models.load_tokenizer(teacher_dir)
        with torch.no_grad():
            s_in = student.get_input_embeddings().weight
            s_in.copy_(transfer_embeddings(t_in.detach(), t_tok, tokenizer))
            s_out = student.get_output_embeddings().weight
            if s_out.data_ptr() != s_in.data_ptr():
                s_out.copy_(transfer_embeddings(t_out.detach(), t_tok, tokenizer))
    student.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def init_student(job: Job, dest: Path) -> Path:
    """The student's initial Hugging Face directory, built once under the run directory."""
    if (dest / "config.json").is_file():
        return dest
    if job.student.init == "teacher-layers":
        return init_from_teacher_layers(
            models.resolve_model(job.teacher.model),
            job.student.layers,
            dest,
            job.student.layer_selection,
            job.resolve(job.student.tokenizer) if job.student.tokenizer else None,
        )
    if not job.student.model:
        raise DistillError("student.init = 'pretrained' needs student.model (a model directory)")
    return models.resolve_model(job.student.model)


ACROSS = (
    "use a student with the teacher's tokenizer, or distil across tokenizers: "
    "student.tokenizer on targets written with targets.alignment = true, with loss.alm / "
    "loss.xkl or loss.ce as the only term"
)


def check_compatible(
    model: Any, tokenizer: Any, manifest: Manifest, where: str, hint: str = ACROSS
) -> None:
    """Refuse a student whose vocab or tokenizer differs from the teacher's targets; ``hint``
    says what to do instead."""
    v = models.vocab_size(model)
    if v != manifest.vocab_size:
        raise DistillError(
            f"student vocab size {v} != teacher's {manifest.vocab_size} in {where}: the sparse "
            "targets index the teacher's vocabulary; " + hint
        )
    fp = models.tokenizer_fingerprint(tokenizer)
    if fp != manifest.tokenizer_fingerprint:
        raise DistillError(
            f"student tokenizer differs from the teacher's (fingerprint {fp[:12]} != "
            f"{manifest.tokenizer_fingerprint[:12]} in {where}): token ids would not line up; "
            + hint
        )
