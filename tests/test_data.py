"""Chat rendering with the real SmolLM2 chat template, assistant-only loss masks, bad input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from distill.data.dataset import TokenizeStats, read_jsonl, render, to_messages, tokenize_file
from distill.errors import DistillError


def assistant_text(tok, sample) -> str:
    return tok.decode(sample.input_ids[sample.loss_mask.astype(bool)])


def test_mask_covers_exactly_the_assistant_turns(smol_tokenizer):
    msgs = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
    ]
    s = render(smol_tokenizer, msgs, "x")
    full = smol_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert smol_tokenizer.decode(s.input_ids) == full
    masked = assistant_text(smol_tokenizer, s)
    assert masked == (
        "Hello! How can I help?<|im_end|>\nWhy did the chicken cross the road?<|im_end|>\n"
    )
    # nothing of the system prompt, the user turns or the role headers is a label
    assert "Hi there" not in masked and "assistant" not in masked and "system" not in masked


def test_instruction_form_and_system(smol_tokenizer):
    msgs = to_messages({"prompt": "2+2?", "response": "4", "system": "Be brief."}, "x")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    s = render(smol_tokenizer, msgs, "x")
    assert assistant_text(smol_tokenizer, s) == "4<|im_end|>\n"
    assert "Be brief." in smol_tokenizer.decode(s.input_ids)


def write_jsonl(tmp_path: Path, lines: list) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_tokenize_file_keys_stats_and_truncation(smol_tokenizer, tmp_path):
    long = {"prompt": "Say many words.", "response": " ".join(["word"] * 200)}
    p = write_jsonl(tmp_path, [{"prompt": "a", "response": "b"}, "", long])
    with pytest.raises(DistillError, match=r"d.jsonl:3: \d+ tokens > data.max_length=64"):
        tokenize_file(p, smol_tokenizer, 64, "error")
    samples = tokenize_file(p, smol_tokenizer, 64, "right")
    assert [s.key for s in samples] == ["d-0000001", "d-0000003"]
    assert len(samples[1].input_ids) == 64 and samples[1].n_targets > 0
    assert samples[0].input_ids.dtype == np.int32 and samples[0].loss_mask.dtype == np.uint8


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"prompt": "a", "response": ', "d.jsonl:2: malformed JSON"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object"),
        ('{"text": "hello"}', "d.jsonl:2: expected 'messages'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "d.jsonl:2: no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role must be one of"),
        ('{"prompt": "a", "response": "   "}', "d.jsonl:2: no assistant turn"),
        ('{"prompt": 3, "response": "x"}', "instruction form needs string 'prompt'"),
    ],
)
def test_bad_lines_name_file_and_line(smol_tokenizer, tmp_path, line, needle):
    p = write_jsonl(tmp_path, [{"prompt": "ok", "response": "fine"}, line])
    with pytest.raises(DistillError) as e:
        tokenize_file(p, smol_tokenizer, 128)
    assert needle in str(e.value)


def test_sample_empty_after_truncation(smol_tokenizer, tmp_path):
    p = write_jsonl(tmp_path, [{"prompt": "x " * 100, "response": "y"}])
    with pytest.raises(DistillError, match="no assistant tokens left after truncation"):
        tokenize_file(p, smol_tokenizer, 32, "right")


def test_missing_file(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        list(read_jsonl(tmp_path / "nope.jsonl"))


# --- every bad line at once; on_invalid ------------------------------------------------------


def test_non_utf8_line_names_file_line_and_byte(smol_tokenizer, tmp_path):
    p = write_jsonl(tmp_path, [{"prompt": "ok", "response": "fine"}])
    with p.open("ab") as f:
        f.write('{"prompt": "caf\u00e9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DistillError) as e:
        tokenize_file(p, smol_tokenizer, 128)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: not UTF-8 (byte 0xe9 at column 16); re-save the file as UTF-8")
    assert "\n" not in msg  # one line


def bad_file(tmp_path: Path, n_bad: int) -> tuple[Path, list[int]]:
    """Good lines with ``n_bad`` bad ones of several kinds between them; their line numbers."""
    bad = ['{"prompt": "a", ', "[1]", '{"text": "t"}', '{"prompt": "q", "response": " "}']
    lines, bad_at = [], []
    for i in range(n_bad):
        lines.append({"prompt": f"q{i}", "response": f"answer {i}"})
        lines.append(bad[i % len(bad)])
        bad_at.append(len(lines))
    lines.append({"prompt": "last", "response": "one"})
    return write_jsonl(tmp_path, lines), bad_at


def test_every_bad_line_is_reported_up_to_a_cap(smol_tokenizer, tmp_path):
    p, bad_at = bad_file(tmp_path, 25)
    with pytest.raises(DistillError) as e:
        tokenize_file(p, smol_tokenizer, 128)
    msg = str(e.value)
    assert msg.startswith(f"{p}: 25 invalid lines:")
    listed = [int(x) for x in re.findall(r"d\.jsonl:(\d+): ", msg)]
    assert listed == bad_at[:20]  # in file order, each once
    assert "... and 5 more" in msg and 'data.on_invalid = "skip"' in msg


def test_on_invalid_skip_leaves_bad_lines_out_and_counts_them(smol_tokenizer, tmp_path):
    p, bad_at = bad_file(tmp_path, 25)
    st = TokenizeStats()
    samples = tokenize_file(p, smol_tokenizer, 128, stats=st, on_invalid="skip")
    assert st.invalid == 25 and st.invalid_lines == bad_at[:20]
    assert st.invalid_info() == {"count": 25, "first_lines": bad_at[:20]}
    n_lines = 2 * 25 + 1
    # keys stay line-based: a skipped line renames no other sample
    assert [s.key for s in samples] == [
        f"d-{n:07d}" for n in range(1, n_lines + 1) if n not in bad_at
    ]
    with pytest.raises(DistillError, match="on_invalid = 'bogus': one of error, skip"):
        tokenize_file(p, smol_tokenizer, 128, on_invalid="bogus")
