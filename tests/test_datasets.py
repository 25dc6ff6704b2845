"""The formats users bring: pre-tokenized token-id datasets (read as-is) and Hugging Face datasets on disk."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saescope.precompute.data import iter_contexts, iter_dataset_contexts, iter_texts, token_column
from saescope.precompute.models import load_tokenizer
from tests.conftest import TINY_ARGS
from tests.helpers import dump_tables

TABLES = ("features", "examples", "groups", "contexts")


@pytest.fixture(scope="module")
def text_contexts(tiny_lm_dir, small_corpus) -> list[np.ndarray]:
    tok = load_tokenizer(str(tiny_lm_dir))
    n = TINY_ARGS["tokens"] // TINY_ARGS["context_len"]
    it = iter_contexts(iter_texts(str(small_corpus)), tok, TINY_ARGS["context_len"], True)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("fmt, column", [("jsonl", "input_ids"), ("parquet", "tokens")])
def test_pretokenized_input_gives_the_same_store_as_the_same_tokens_fed_as_text(
        fmt, column, text_contexts, tiny_store, tiny_lm_dir, tiny_sae_dir, tmp_path):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    src = tmp_path / f"tokens.{fmt}"
    if fmt == "jsonl":
        src.write_text("".join(json.dumps({column: c.tolist(), "id": i}) + "\n" for i, c in enumerate(text_contexts)))
    else:
        pq.write_table(pa.table({column: [c.tolist() for c in text_contexts]}), src)
    assert token_column(str(src)) == column
    out = tmp_path / "pretok.duckdb"
    run_precompute(PrecomputeSpec(out=out, model=str(tiny_lm_dir), saes=[SAESpec(str(tiny_sae_dir), sae_id="tiny")],
                                  dataset=str(src), **TINY_ARGS))
    got, want = dump_tables(out, "tiny", TABLES), dump_tables(tiny_store, "tiny", TABLES)
    for table in TABLES:
        assert got[table] == want[table], table


def test_pretokenized_rows_are_never_retokenized_and_bos_follows_the_config(tiny_lm_dir, tmp_path):
    tok = load_tokenizer(str(tiny_lm_dir))
    bos = tok.bos_token_id
    rows = [[bos, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]  # the second lacks BOS
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"tokens": r}) + "\n" for r in rows))
    got = [c.tolist() for c in iter_dataset_contexts(str(src), "text", tok, 4, prepend_bos=True)]
    assert got == [[bos, 5, 6, 7], [bos, 10, 11, 12]]
    got = [c.tolist() for c in iter_dataset_contexts(str(src), "text", tok, 4, prepend_bos=False)]
    assert got == [[bos, 5, 6, 7], [10, 11, 12, 13]]
    with pytest.raises(ValueError, match="row 0 has 6 tokens.*at least --context-len 8"):
        list(iter_dataset_contexts(str(src), "text", tok, 8, prepend_bos=False))
    src.write_text(json.dumps({"tokens": [bos, 10**7, 1, 2]}) + "\n")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        list(iter_dataset_contexts(str(src), "text", tok, 4, prepend_bos=True))


def test_hugging_face_datasets_on_disk_read_offline(small_corpus, tmp_path):
    import datasets

    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()[:12]]
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(saved))
    assert list(iter_texts(str(saved))) == texts
    files = tmp_path / "files"
    files.mkdir()
    (files / "part.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    assert list(iter_texts(str(files), "body")) == texts  # a folder of data files, through load_dataset
    with pytest.raises(ValueError, match="no column 'nope'"):
        list(iter_texts(str(saved), "nope"))
    toks = tmp_path / "tok_saved"
    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]]}).save_to_disk(str(toks))
    assert token_column(str(toks)) == "input_ids"


def test_sae_release_references_resolve_through_the_saelens_registry_offline(monkeypatch):
    from saescope.precompute.releases import ReleaseError
    from saescope.precompute.saes import load_sae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        load_sae("gemma-scope-2b-pt-res-canonical/layer_5/width_16k/canonical")
    msg = str(err.value)
    assert "google/gemma-scope-2b-pt-res" in msg and "hf download" in msg and "--hook blocks.5.hook_resid_post" in msg
    with pytest.raises(ReleaseError, match="did you mean: gemma-scope-2b-pt-res-canonical"):
        load_sae("gemma-scope-2b-pt-res-canonicl/layer_5/width_16k/canonical")
