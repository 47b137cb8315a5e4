"""Cross-tokenizer training end to end on the tiny teacher (#24 items 3 and 4): SmolLM2's
tokenizer writes aligned shards, a student with a BPE of another vocabulary trains from them
with loss.alm and loss.xkl; the config's refusals; the student's embeddings start from the
teacher's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, bpe_tokenizer, make_job

from distill import models
from distill.config import load_job
from distill.errors import DistillError
from distill.student import train as train_mod
from distill.student.train import train
from distill.student.vocab_init import teacher_pieces, transfer_embeddings
from distill.teacher.run import run_teacher

XTOK = ["loss.forward_kl=0", "loss.ce=0.1", "loss.alm=1", "loss.xkl=1"]


@pytest.fixture(scope="module")
def aligned(tiny_teacher_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(the job file of an aligned shard set, a BPE student tokenizer directory)."""
    tmp = tmp_path_factory.mktemp("xtok-train")
    path = make_job(
        tmp, tiny_teacher_dir, str(tmp / "o"), n_train=32, n_eval=8, targets__alignment="true"
    )
    run_teacher(load_job(path))
    bpe = tmp / "bpe"
    bpe_tokenizer().save_pretrained(bpe)
    return path, bpe


def _job(aligned: tuple[Path, Path], run: Path, *extra: str):
    path, bpe = aligned
    sets = [f'student.tokenizer="{bpe}"', f'train.run_dir="{run}"', *XTOK, *extra]
    return load_job(path, sets)


def _records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def test_a_bpe_student_trains_from_aligned_smollm2_targets(aligned, tmp_path) -> None:
    """4 steps an epoch (32 samples, batch 8), 3 epochs: every term is finite and positive,
    and the loss over the third epoch is below the first's (the same samples)."""
    job = _job(aligned, tmp_path / "run", "train.epochs=3", "train.lr=3e-3")
    summary = train(job)
    assert summary["steps"] == 12 and np.isfinite(summary["final_loss"])
    recs = _records(tmp_path / "run")
    assert [r["step"] for r in recs] == list(range(1, 13))
    for r in recs:
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("loss", "ce", "alm", "xkl")), r
        # the total is the weighted sum (temperature 1)
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + r["alm"] + r["xkl"], rel=1e-5)
    first = np.mean([r["loss"] for r in recs[:4]])
    last = np.mean([r["loss"] for r in recs[-4:]])
    assert last < 0.9 * first, (first, last)
    student = tmp_path / "run" / "student"
    tok = models.load_tokenizer(student)
    model = models.load_model(student, "float32", "cpu")
    assert len(tok) == 2000 and models.vocab_size(model) == 2000


def test_a_killed_run_resumes_to_the_same_weights(aligned, tmp_path, monkeypatch) -> None:
    sets = ("train.epochs=2", "train.checkpoint_every=3")
    train(_job(aligned, tmp_path / "a", *sets))
    resumed = _job(aligned, tmp_path / "b", *sets)
    step, done = train_mod.train_step, []

    def killed_after_4_steps(*args: object) -> object:
        if len(done) == 4:
            raise KeyboardInterrupt("killed (simulated)")
        done.append(1)
        return step(*args)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(train_mod, "train_step", killed_after_4_steps)
        train(resumed)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 3
    train(resumed)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 8
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=0, atol=1e-6)


def test_config_refusals(aligned, tmp_path) -> None:
    path, bpe = aligned
    with pytest.raises(DistillError, match="set student.tokenizer"):
        load_job(path, XTOK)
    with pytest.raises(DistillError, match="need targets.alignment = true"):
        load_job(path, [*XTOK, f'student.tokenizer="{bpe}"', "targets.alignment=false"])
    with pytest.raises(DistillError, match="loss.forward_kl index the teacher's vocabulary"):
        load_job(path, [*XTOK, f'student.tokenizer="{bpe}"', "loss.forward_kl=0.5"])
    # a shard set written without targets.alignment (no offsets, no stored tokenizer)
    from types import SimpleNamespace

    from distill.student.xtok_setup import stored_teacher_tokenizer

    plain = SimpleNamespace(
        manifest=SimpleNamespace(targets={"kind": "sample"}),
        cache=SimpleNamespace(store=SimpleNamespace(url="gs://b/o/train")),
    )
    with pytest.raises(DistillError, match="gs://b/o/train was written without targets.alignment"):
        stored_teacher_tokenizer(plain, tmp_path / "t")  # type: ignore[arg-type]
    # another vocabulary without a cross-tokenizer term: today's refusal
    other = load_job(path, [f'student.tokenizer="{bpe}"', f'train.run_dir="{tmp_path / "r"}"'])
    with pytest.raises(DistillError, match="student vocab size 2000 != teacher's 49152"):
        train(other)
    # CE alone on targets without alignment has no student tokens to train on: the same refusal
    ce_plain = load_job(
        path,
        [
            f'student.tokenizer="{bpe}"',
            f'train.run_dir="{tmp_path / "r2"}"',
            "loss.forward_kl=0",
            "loss.ce=1",
            "targets.alignment=false",
        ],
    )
    with pytest.raises(DistillError, match="or loss.ce as the only term"):
        train(ce_plain)


def test_a_bpe_student_trains_on_its_own_tokens_with_ce_alone(aligned, tmp_path) -> None:
    """The CE-only baseline of a cross-tokenizer student: student.tokenizer with loss.ce as the
    only term trains through the aligned data path; every step logs CE alone, its loss is CE,
    and it falls over 3 epochs of the same samples."""
    path, bpe = aligned
    sets = [f'student.tokenizer="{bpe}"', f'train.run_dir="{tmp_path / "run"}"']
    job = load_job(
        path, [*sets, "loss.forward_kl=0", "loss.ce=1", "train.epochs=3", "train.lr=1e-2"]
    )
    summary = train(job)
    assert summary["steps"] == 12 and np.isfinite(summary["final_loss"])
    recs = _records(tmp_path / "run")
    for r in recs:
        assert "alm" not in r and "xkl" not in r, r
        assert r["loss"] == pytest.approx(r["ce"], rel=1e-6) and r["ce"] > 0
    first = np.mean([r["loss"] for r in recs[:4]])
    last = np.mean([r["loss"] for r in recs[-4:]])
    assert last < 0.9 * first, (first, last)
    student = tmp_path / "run" / "student"
    tok = models.load_tokenizer(student)
    assert models.vocab_size(models.load_model(student, "float32", "cpu")) == 2000 == len(tok)
    # `distill-ctl eval`: the student's own tokens, held-out bits per byte (not the shards')
    from rich.console import Console

    from distill.student.bits_per_byte import bits_per_byte, split_messages
    from distill.student.report import compare_students

    got = compare_students(job, "", Console(quiet=True))
    assert got["metric"] == "bits per byte of held-out assistant text"
    before, after = got["initialised"], got["trained"]
    assert after["bpb"] < before["bpb"] and before["bytes"] == after["bytes"] > 0
    records = list(split_messages(str(job.resolve(job.data.eval)), tmp_path / "scratch"))
    assert len(records) == 8
    direct = bits_per_byte(models.load_model(student, "float32", "cpu"), tok, records)
    assert direct["bpb"] == pytest.approx(after["bpb"], rel=1e-9)
    assert (
        json.loads((tmp_path / "run" / "eval.json").read_text())["trained"]["bpb"] == after["bpb"]
    )


def test_which_students_train_on_their_own_tokens(aligned, tiny_teacher_dir) -> None:
    """CE alone takes the aligned data path only for another tokenizer: the teacher's own
    tokenizer given as student.tokenizer keeps the same-tokenizer path (held-out eval,
    packing, torchrun); a cross-tokenizer term always takes it; no alignment, never."""
    path, bpe = aligned
    _, manifest = train_mod.open_targets(load_job(path), "train")
    ce = ["loss.forward_kl=0", "loss.ce=1"]
    cases = [
        (bpe, ce, True),
        (tiny_teacher_dir, ce, False),
        (bpe, ["loss.forward_kl=0.9", "loss.ce=0.1"], False),  # refused later: vocab mismatch
        (bpe, [*ce, "targets.alignment=false"], False),
        (bpe, XTOK, True),
    ]
    for tok_dir, sets, want in cases:
        job = load_job(path, [f'student.tokenizer="{tok_dir}"', *sets])
        tok = models.load_tokenizer(tok_dir)
        assert train_mod.trains_on_own_tokens(job, tok, manifest) is want, (tok_dir, sets)


def test_the_student_embeddings_average_the_teachers(smol_tokenizer, tmp_path) -> None:
    """Hand-picked tokens: one teacher token, several, a special token with no counterpart."""
    bpe = bpe_tokenizer()
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(len(smol_tokenizer), 6, generator=g, dtype=torch.float64)
    got = transfer_embeddings(rows, smol_tokenizer, bpe)
    assert got.shape == (len(bpe), 6)
    t = smol_tokenizer.convert_tokens_to_ids
    # "Ġthe" is " the" in both vocabularies
    torch.testing.assert_close(got[bpe.convert_tokens_to_ids("Ġthe")], rows[t("Ġthe")])
    # a word the BPE holds whole and SmolLM2 splits: the mean of SmolLM2's pieces
    pieces = teacher_pieces(smol_tokenizer, bpe)
    multi = [i for i, p in enumerate(pieces) if p is not None and len(p) == 3]
    assert multi
    i = multi[0]
    s_text = bpe.convert_tokens_to_string([bpe.convert_ids_to_tokens(i)])
    ids = smol_tokenizer(s_text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3 and smol_tokenizer.decode(ids) == s_text
    ref = (rows[ids[0]] + rows[ids[1]] + rows[ids[2]]) / 3
    torch.testing.assert_close(got[i], ref)
    # "<s>" is not a SmolLM2 token: the mean row
    assert "<s>" not in smol_tokenizer.get_vocab()
    torch.testing.assert_close(got[bpe.convert_tokens_to_ids("<s>")], rows.mean(0))


def test_teacher_layers_init_with_a_student_tokenizer(aligned, tiny_teacher_dir, tmp_path) -> None:
    from distill.student.init import init_from_teacher_layers

    _, bpe = aligned
    dest = init_from_teacher_layers(tiny_teacher_dir, 2, tmp_path / "s", tokenizer_dir=bpe)
    teacher = models.load_model(tiny_teacher_dir, "float32", "cpu")
    student = models.load_model(dest, "float32", "cpu")
    s_tok, t_tok = models.load_tokenizer(dest), models.load_tokenizer(tiny_teacher_dir)
    assert len(s_tok) == 2000 and student.config.eos_token_id == s_tok.eos_token_id
    t_emb = teacher.get_input_embeddings().weight.detach()
    s_emb = student.get_input_embeddings().weight.detach()
    i = s_tok.convert_tokens_to_ids("Ġthe")
    torch.testing.assert_close(s_emb[i], t_emb[t_tok.convert_tokens_to_ids("Ġthe")])
    torch.testing.assert_close(s_emb, transfer_embeddings(t_emb, t_tok, s_tok))
    # the kept layers are the teacher's
    sd, td = student.state_dict(), teacher.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(sd[name], td[name])


def _xsample(g: torch.Generator, n: int, vocab: int, t_vocab: int, k: int, key: str):
    from distill.student.xtok_data import XSample

    ids = torch.randint(0, vocab, (n,), generator=g).numpy()
    ce_pos = np.arange(1, n - 1)
    n_chunks = 4
    row_chunk = torch.randint(-1, n_chunks, (len(ce_pos),), generator=g).numpy()
    pair_pos = ce_pos[::2]
    lp = torch.log_softmax(torch.randn(len(pair_pos), k, generator=g), -1)
    lp[:, -1] = float("-inf")  # padding
    return XSample(
        key=key,
        input_ids=ids,
        ce_pos=ce_pos,
        row_chunk=row_chunk,
        chunk_lp=(-torch.rand(n_chunks, generator=g, dtype=torch.float64) * 20).numpy(),
        complete=np.array([True, False, True, True]),
        pair_pos=pair_pos,
        pair_ids=torch.randint(0, t_vocab, (len(pair_pos), k), generator=g).numpy(),
        pair_lp=lp.numpy(),
    )


def test_the_step_loss_is_the_weighted_sum_over_the_batch_rows() -> None:
    """collate_x + xtok_loss against a per-sample reference: CE from the full log-softmax at
    each sample's own rows, ALM and the projected KL on the concatenated rows (chunk ids
    offset per sample), the KL scaled by tau**2."""
    from distill.config import LossWeights
    from distill.student.xtok_data import collate_x
    from distill.student.xtok_loss import xtok_loss
    from distill.student.xtok_terms import alm_loss, projected_kl

    g = torch.Generator().manual_seed(3)
    vocab, t_vocab, hdim = 30, 50, 6
    samples = [_xsample(g, n, vocab, t_vocab, 4, f"s{n}") for n in (9, 14, 6)]
    batch = collate_x(samples, pad_id=0)
    b, t = batch.input_ids.shape
    hidden = torch.randn(b, t, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    vmap = torch.randint(-1, vocab, (t_vocab,), generator=g)
    w = LossWeights(forward_kl=0, ce=0.3, alm=0.7, xkl=0.5, temperature=2.0)
    got, terms = xtok_loss(hidden, weight, batch, w, vmap, chunk=5)

    rows, labels, chunks, pairs, p_ids, p_lp, c_lp, comp = [], [], [], [], [], [], [], []
    offset = 0
    for i, s in enumerate(samples):
        rows.append(hidden[i, torch.from_numpy(s.ce_pos)])
        labels.append(torch.from_numpy(s.input_ids[s.ce_pos + 1]))
        rc = torch.from_numpy(s.row_chunk)
        chunks.append(torch.where(rc >= 0, rc + offset, -1))
        offset += len(s.chunk_lp)
        pairs.append(hidden[i, torch.from_numpy(s.pair_pos)])
        p_ids.append(torch.from_numpy(s.pair_ids))
        p_lp.append(torch.from_numpy(s.pair_lp))
        c_lp.append(torch.from_numpy(s.chunk_lp))
        comp.append(torch.from_numpy(s.complete))
    r, lab = torch.cat(rows), torch.cat(labels)
    logq = (r @ weight.T).log_softmax(-1)
    ce = -logq[torch.arange(len(lab)), lab].mean()
    alm = alm_loss(r, weight, lab, torch.cat(chunks), torch.cat(c_lp), torch.cat(comp))
    kl = projected_kl(
        torch.cat(pairs), weight, torch.cat(p_ids), torch.cat(p_lp).double(), vmap, 2.0
    ).mean()
    ref = 0.3 * ce + 0.7 * alm + 4.0 * 0.5 * kl
    assert ce > 0 and alm > 0 and kl > 0
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(terms["xkl"], kl.float().detach(), rtol=1e-5, atol=1e-7)
    gh, gw = torch.autograd.grad(got, [hidden, weight])
    rh, rw = torch.autograd.grad(ref, [hidden, weight])
    torch.testing.assert_close(gh, rh, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-9)
    assert gh[batch.attention_mask == 0].abs().sum() == 0  # padding gets no gradient


def test_the_student_reads_what_the_teacher_stored(aligned) -> None:
    """Per stored sample, the student's own labels (its assistant tokens) spell the teacher's
    stored contents (but for a first word merged into the template's space); where the teacher
    truncated, they end exactly where the teacher's content ends."""
    from distill.data.dataset import to_messages
    from distill.format.manifest import MANIFEST, Manifest
    from distill.format.shards import read_shard
    from distill.student.xtok_data import student_sample

    path, bpe_dir = aligned
    job = load_job(path)
    split = Path(job.output) / "train"
    m = Manifest.from_json((split / MANIFEST).read_bytes(), "m")
    samples = [s for sh in m.shards for s in read_shard(split / sh.name, m.vocab_size)]
    records = [json.loads(x) for x in Path(job.data.train).read_text().splitlines()]
    bpe, smol = models.load_tokenizer(bpe_dir), models.load_tokenizer(split / "tokenizer")
    cut = pairs = chunks = 0
    for s, rec in zip(samples, records, strict=True):
        msgs = to_messages(rec, "t")
        x = student_sample(s, msgs, bpe)
        labels = bpe.decode(x.input_ids[x.ce_pos + 1])
        t_text = smol.decode(s.input_ids)
        stored = [t_text[a:b] for a, b in s.content_spans.tolist()]
        for c in stored:
            assert c[-min(12, len(c) - 3) :] in labels, (s.key, c)
        said = sum(len(mm["content"].strip()) for mm in msgs if mm["role"] == "assistant")
        if sum(map(len, stored)) < said:
            cut += 1
            assert labels.endswith(stored[-1][-20:]), (s.key, stored[-1][-20:], labels[-30:])
        assert (x.pair_pos < len(x.input_ids) - 1).all()
        pairs += len(x.pair_pos)
        chunks += int(x.complete.sum())
    rows = sum(len(s.target_logprobs) for s in samples)
    assert cut > 0 and pairs > 0.7 * rows and chunks > 0.5 * rows


def test_the_record_index_reads_each_record_by_key_without_holding_plain_files(tmp_path):
    """A plain JSONL file is read by byte offset (no record held); a compressed one is held;
    both give the records' messages as a full read does, and an unknown key is refused."""
    import gzip

    from distill.data.dataset import key
    from distill.data.encode import parse
    from distill.student.xtok_data import RecordIndex

    lines = (REPO / "data" / "demo" / "train.jsonl").read_text().splitlines()[:40]
    lines.insert(5, "")  # a blank line keeps the later lines' numbers
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join(lines) + "\n")
    (d / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[:10]) + "\n").encode()))
    idx = RecordIndex(str(d), tmp_path / "scratch")
    assert set(idx.offsets) == {"a"} and all(k.startswith("b-") for k in idx.raw)
    for stem, count in (("a", len(lines)), ("b", 10)):
        for n, line in enumerate(lines[:count], start=1):
            if not line:
                continue
            assert idx.messages(key(stem, n)) == parse(line.encode(), n, "x"), (stem, n)
    for bad in (key("a", 6), key("a", 999), key("c", 1), "nokey"):
        with pytest.raises(DistillError, match="not in the job's dataset"):
            idx.messages(bad)
