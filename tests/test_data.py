"""Text sources and fixed-length contexts: every local format, BOS handling, and errors that name the fix."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saescope.precompute.data import iter_contexts, iter_texts, special_mask


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


DOCS = ["The quick brown fox jumps over the lazy dog. " * 5, "def f(x):\n    return x * 2\n" * 4]


def test_txt_jsonl_and_parquet_give_the_same_documents(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n\n".join(DOCS))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    assert list(iter_texts(str(tmp_path / "a.txt"))) == DOCS
    assert list(iter_texts(str(tmp_path / "a.jsonl"), text_field="body")) == DOCS
    assert list(iter_texts(str(tmp_path / "a.parquet"), text_field="body")) == DOCS


def test_bad_sources_name_the_fix(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: no field 'text' \(fields: content\); set --text-field"):
        list(iter_texts(str(tmp_path / "a.jsonl")))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="valid: .txt, .jsonl, .parquet"):
        list(iter_texts(str(tmp_path / "a.csv")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_texts("./missing.jsonl"))
    with pytest.raises(ValueError, match="pip install datasets|no network"):
        list(iter_texts("some-org/some-dataset"))


def test_contexts_are_bos_plus_a_slice_of_the_token_stream(tok):
    ctxs = list(iter_contexts(iter(DOCS), tok, 16, prepend_bos=True))
    stream = []
    for d in DOCS:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(len(c) == 16 and c[0] == tok.bos_token_id for c in ctxs)
    assert np.concatenate([c[1:] for c in ctxs]).tolist() == stream[:15 * len(ctxs)]
    plain = list(iter_contexts(iter(DOCS), tok, 16, prepend_bos=False))
    assert np.concatenate(plain).tolist() == stream[:16 * len(plain)]
    mask = special_mask(np.stack(ctxs), tok)
    assert mask[:, 0].all() and mask.sum() == len(ctxs) + sum(c[1:].tolist().count(tok.eos_token_id) for c in ctxs)
