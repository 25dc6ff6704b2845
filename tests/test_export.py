"""`saescope export --format neuronpedia`: the files have SAEDashboard's layout and carry the store's numbers.

The expected key sets below are written out from SAEDashboard 0.8.0's NeuronpediaDashboardBatch / Feature /
Activation `to_dict()` (and the fields Neuronpedia's convert-saedashboard-to-neuronpedia-export.py reads), not
imported from the module under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from saescope.app.cli import build_parser, main
from saescope.precompute.export import export_neuronpedia, feature_batches, neuronpedia_api_feature, parse_features
from saescope.precompute.store import Store

BATCH = {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": (str, type(None)), "features": list}
FEATURE = {
    "feature_index": int,
    "neuron_alignment_indices": list, "neuron_alignment_values": list, "neuron_alignment_l1": list,
    "correlated_neurons_indices": list, "correlated_neurons_l1": list, "correlated_neurons_pearson": list,
    "correlated_features_indices": list, "correlated_features_l1": list, "correlated_features_pearson": list,
    "neg_str": list, "neg_values": list, "pos_str": list, "pos_values": list, "frac_nonzero": float,
    "freq_hist_data_bar_values": list, "freq_hist_data_bar_heights": list,
    "logits_hist_data_bar_heights": list, "logits_hist_data_bar_values": list,
    "n_prompts_total": int, "n_tokens_in_prompt": int, "dataset": str, "decoder_weights_dist": list,
    "activations": list, "vector": list,
}
NUMBER = (int, float)
ACTIVATION = {"bin_min": NUMBER, "bin_max": float, "bin_contains": NUMBER, "tokens": list, "values": list,
              "qualifying_token_index": int, "dfa_values": list, "dfa_maxValue": int, "dfa_targetIndex": int}
DFA_OFF = {"dfa_values": [], "dfa_maxValue": 0, "dfa_targetIndex": -1}  # the runner's output with use_dfa off
# no such data in a store: SAEDashboard writes these as empty lists when the table is disabled
EMPTY = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
         "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
         "correlated_features_pearson", "decoder_weights_dist", "vector")
TOL = 5e-4 + 1e-7  # values are rounded to 3 decimals, like SAEDashboard's round_list
PER_BATCH = 40  # 96 tiny features -> ceil(96 / 40) = 3 batches of 32 (numpy.array_split), not 40/40/16


@pytest.fixture(scope="module")
def exported(tiny_store, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("export") / "np"
    r = export_neuronpedia(tiny_store, out, "tiny", features_per_batch=PER_BATCH, progress=False)
    assert r.files == [out / f"batch-{i}.json" for i in range(len(r.files))]
    return out, [json.loads(f.read_text()) for f in r.files]


def _check_types(obj: dict, spec: dict, where: str) -> None:
    assert set(obj) == set(spec), f"{where}: keys differ: extra {set(obj) - set(spec)}, missing {set(spec) - set(obj)}"
    for k, t in spec.items():
        assert isinstance(obj[k], t) and not isinstance(obj[k], bool), f"{where}.{k}: {type(obj[k]).__name__}"


def _all_of(xs: list, t: type) -> bool:
    return all(isinstance(x, t) and not isinstance(x, bool) for x in xs)


def test_folder_layout_and_batches_like_the_runner(exported, tiny_store):
    out, batches = exported
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "batch-1.json", "batch-2.json",
                                                     "run_settings.json", "skipped_indexes.json"]
    assert [p.name for p in out.parent.iterdir()] == ["np"], "the temporary folder was renamed, nothing left over"
    got = [[f["feature_index"] for f in b["features"]] for b in batches]
    want = [a.tolist() for a in np.array_split(np.arange(96), math.ceil(96 / PER_BATCH))]
    assert got == want and [len(g) for g in got] == [32, 32, 32]
    skipped = json.loads((out / "skipped_indexes.json").read_text())
    assert skipped["skipped_indexes"] == [] and skipped["layer"] == "1"
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["n_features_at_a_time"] == PER_BATCH and settings["saescope"]["sae_id"] == "tiny"


def test_batch_files_match_saedashboard_schema(exported):
    _, batches = exported
    for b in batches:
        _check_types(b, BATCH, "batch")
        assert b["model_id"] and b["layer"] == 1 and b["sae_set"] == "tiny" and b["sae_id_suffix"] is None
        for f in b["features"]:
            where = f"feature {f['feature_index']}"
            _check_types(f, FEATURE, where)
            assert list(f) == list(FEATURE), "SAEDashboard's key order"
            assert all(f[k] == [] for k in EMPTY), where
            assert _all_of(f["pos_str"] + f["neg_str"], str) and len(f["pos_str"]) == len(f["pos_values"]) == 10
            for k in ("pos_values", "neg_values", "freq_hist_data_bar_values", "logits_hist_data_bar_values"):
                assert _all_of(f[k], float), f"{where}.{k}"
            for k in ("freq_hist_data_bar_heights", "logits_hist_data_bar_heights"):
                assert _all_of(f[k], int), f"{where}.{k}"
            for a in f["activations"]:
                _check_types(a, ACTIVATION, f"{where}.activation")
                assert list(a) == list(ACTIVATION) and {k: a[k] for k in DFA_OFF} == DFA_OFF
                assert _all_of(a["tokens"], str) and _all_of(a["values"], float)
                assert len(a["tokens"]) == len(a["values"]) and 0 <= a["qualifying_token_index"] < len(a["values"])
                assert max(a["values"]) > 0, "Neuronpedia's importer takes max(values) as the row's maxValue"


def test_values_round_trip_against_the_store(exported, tiny_store):
    _, batches = exported
    feats = {f["feature_index"]: f for b in batches for f in b["features"]}
    with Store(tiny_store) as store:
        sae = store.sae("tiny")
        assert sae.prepend_bos, "the tiny store starts contexts with BOS (the case SAEDashboard's layout has)"
        n_vocab = len(store.vocab(sae.model_key))
        n_live = 0
        for i in range(sae.d_sae):
            d, f = feats[i], store.feature("tiny", i)
            assert d["pos_str"] == [t for t, _ in f.logit_pos] and d["neg_str"] == [t for t, _ in f.logit_neg]
            np.testing.assert_allclose(d["pos_values"], [v for _, v in f.logit_pos], atol=TOL, rtol=0)
            np.testing.assert_allclose(d["neg_values"], [v for _, v in f.logit_neg], atol=TOL, rtol=0)
            assert d["pos_values"] == sorted(d["pos_values"], reverse=True) and d["neg_values"] == sorted(d["neg_values"])
            assert d["frac_nonzero"] == f.density == f.n_active / sae.n_counted
            assert d["n_prompts_total"] == sae.n_contexts and d["n_tokens_in_prompt"] == sae.context_len == 64
            # the logit histogram covers the whole vocabulary; bar values are the bins' centres (linspace edges)
            assert d["logits_hist_data_bar_heights"] == f.logit_hist and sum(f.logit_hist) == n_vocab
            edges = np.linspace(f.logit_hist_lo, f.logit_hist_hi, len(f.logit_hist) + 1)
            np.testing.assert_allclose(d["logits_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2, atol=TOL, rtol=0)
            if f.n_active == 0:
                assert d["activations"] == [] and d["freq_hist_data_bar_heights"] == [] and d["frac_nonzero"] == 0
                continue
            n_live += 1
            assert d["freq_hist_data_bar_heights"] == f.hist and sum(f.hist) == f.n_active and len(f.hist) == 50
            edges = np.linspace(f.hist_lo, f.hist_hi, len(f.hist) + 1)
            np.testing.assert_allclose(d["freq_hist_data_bar_values"], (edges[:-1] + edges[1:]) / 2, atol=TOL, rtol=0)
            acts = d["activations"]
            top = store.examples("tiny", i, "top")
            groups = store.groups("tiny", i, "interval")
            assert len(acts) == len(top) + sum(len(g.examples) for g in groups)
            bins = [(-1.0, f.max_act, -1.0)] * len(top) + [(g.lo, g.hi, g.n_tokens / sae.n_counted)
                                                          for g in groups for _ in g.examples]
            assert all(type(a["bin_min"]) is int and type(a["bin_contains"]) is int for a in acts[:len(top)])
            for a, e, (lo, hi, contains) in zip(acts, top + [e for g in groups for e in g.examples], bins):
                # the leading BOS is dropped and the qualifying index shifted, as SAEDashboard's runner does
                assert e.tokens[0] == store.vocab(sae.model_key)[e.token_ids[0]] and e.acts[0] == 0
                assert a["tokens"] == e.tokens[1:] and a["qualifying_token_index"] == e.pos - 1
                np.testing.assert_allclose(a["values"], e.acts[1:], atol=TOL, rtol=0)
                assert abs(a["values"][a["qualifying_token_index"]] - e.value) <= TOL
                assert abs(a["bin_min"] - lo) <= TOL and abs(a["bin_max"] - hi) <= TOL
                assert abs(a["bin_contains"] - contains) <= 1e-12
                assert a["bin_min"] == -1 or a["bin_min"] - TOL <= e.value <= a["bin_max"] + TOL
            assert abs(acts[0]["values"][acts[0]["qualifying_token_index"]] - f.max_act) <= TOL
            # interval groups come strongest first, each an equal-width slice of (0, max]
            los = [g.lo for g in groups]
            assert los == sorted(los, reverse=True)
            n_int = sae.params["n_intervals"]
            for g in groups:
                assert g.lo == pytest.approx(f.max_act * g.grp / n_int, rel=1e-5)
        assert n_live >= 10


def test_api_record_uses_neuronpedia_database_names(tiny_store):
    with Store(tiny_store) as store:
        sae = store.sae("tiny")
        f = next(store.feature("tiny", r.index) for r in store.features("tiny", dead=False, limit=1))
        d = neuronpedia_api_feature(store, sae, f)
    assert d["layer"] == "1-tiny" and d["index"] == str(f.index) and d["maxActApprox"] == f.max_act
    assert d["topkCosSimIndices"] == [j for j, _ in f.neighbours] and len(d["freq_hist_data_bar_values"]) == 50
    a = d["activations"][0]
    assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] == pytest.approx(f.max_act)
    assert a["minValue"] == min(a["values"])


def test_unknown_sae_lists_the_valid_ids(tiny_store, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown SAE id 'nope' .*valid: tiny"):
        export_neuronpedia(tiny_store, tmp_path / "x", "nope", progress=False)
    assert not (tmp_path / "x").exists()
    assert main(["export", str(tiny_store), str(tmp_path / "x"), "--sae", "nope"]) == 2
    assert "valid: tiny" in capsys.readouterr().err


def test_refuses_a_non_empty_folder_unless_forced(tiny_store, tmp_path):
    out = tmp_path / "np"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty.*--force"):
        export_neuronpedia(tiny_store, out, "tiny", features=[0, 1], progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = export_neuronpedia(tiny_store, out, "tiny", features=[0, 1], force=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["batch-0.json", "run_settings.json", "skipped_indexes.json"]
    assert [f["feature_index"] for f in json.loads(r.files[0].read_text())["features"]] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["np"]


def test_cli_exports_a_feature_subset_and_explains_itself(tiny_store, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(tiny_store), "--sae", "tiny", "--format", "neuronpedia", str(out),
                 "--features", "0-9,20", "--features-per-batch", "4", "--set-name", "res-tiny",
                 "--sae-id-suffix", "k6"]) == 0
    files = sorted(out.glob("batch-*.json"))
    data = [json.loads(p.read_text()) for p in files]
    # 11 features, at most 4 per file -> ceil(11 / 4) = 3 files of 4, 4, 3 (numpy.array_split)
    assert [[f["feature_index"] for f in b["features"]] for b in data] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 20]]
    assert {(b["sae_set"], b["sae_id_suffix"]) for b in data} == {("res-tiny", "k6")}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    help_text = capsys.readouterr().out
    assert "batch-<n>.json" in help_text and "--features-per-batch" in help_text and "--force" in help_text


def test_bad_feature_specs_say_what_is_allowed():
    assert parse_features("3,0-2,2", 10) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="outside 0-9"):
        parse_features("5-10", 10)
    with pytest.raises(ValueError, match="inclusive ranges"):
        parse_features("a-b", 10)
    with pytest.raises(ValueError, match=">= 1"):
        feature_batches([1, 2], 0)
