"""`saescope export`: a store's SAE in the batch-file layout SAEDashboard's NeuronpediaRunner writes.

Neuronpedia imports a folder of `batch-<n>.json` files (its converter reads every file whose name starts with
`batch-`). Each file is one object: run metadata (`model_id`, `layer`, `sae_set`, `sae_id_suffix`) and a list of
`features`, with the fields of SAEDashboard 0.8.0's NeuronpediaDashboardFeature / NeuronpediaDashboardActivation.
Features are split into batches like the runner does (`numpy.array_split` into ceil(n / per_batch) parts), numbers
are rounded to 3 decimals like its FeatureProcessor.round_list, and the sequences drop the context's first token
when it is the BOS (the runner always drops position 0 and shifts `qualifying_token_index` by one).

What the store does not hold is written as SAEDashboard writes a disabled table: empty lists (neuron alignment,
correlated neurons/features, decoder_weights_dist, vector; per activation dfa_values [], dfa_maxValue 0,
dfa_targetIndex -1, which is what the runner writes with use_dfa off). Nothing is estimated. Checked against a real
SAEDashboard 0.8.0 NeuronpediaRunner output (same keys in the same order, same types).

Where saescope's numbers differ in definition from SAEDashboard's (both kept as saescope measured them):
- `frac_nonzero` is the store's density: active tokens / counted tokens (special tokens excluded from both);
- interval groups are the store's equal-width intervals of (0, max] (SAEDashboard: 5 intervals of [0, max]) and
  `bin_contains` is the interval's active tokens / counted tokens (SAEDashboard's lowest interval also counts the
  zeros, since it starts at 0 inclusive);
- top examples are one per context (SAEDashboard may take several tokens of one context).

The store is read only through `precompute.store.Store`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from .errors import UserError

if TYPE_CHECKING:  # the store (and duckdb) are imported when an export runs, not when the CLI builds its parser
    from .store import Example, Feature, SAEInfo, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NeuronpediaDefaults:
    """SAEDashboard's NeuronpediaRunnerConfig values that shape the files (kept identical)."""

    features_per_batch: int = 128  # n_features_at_a_time
    decimals: int = 3  # FeatureProcessor.round_list
    top_bin: tuple[int, int] = (-1, -1)  # (bin_min, bin_contains) of top-activation examples (JSON ints, as written)
    # what the runner writes per activation when DFA is off (use_dfa=False): no values, max 0, target -1
    dfa_off: tuple[tuple[str, Any], ...] = (("dfa_values", ()), ("dfa_maxValue", 0), ("dfa_targetIndex", -1))


NEURONPEDIA = NeuronpediaDefaults()
FORMATS = ("neuronpedia", "html")  # html: app/web/report.py (issue 22)

# the keys SAEDashboard 0.8.0 writes (NeuronpediaDashboard*.to_dict()); tests check files against these
BATCH_KEYS = ("model_id", "layer", "sae_set", "sae_id_suffix", "features")
FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
    "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_values", "freq_hist_data_bar_heights", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist",
    "activations", "vector",
)
ACTIVATION_KEYS = ("bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index",
                   "dfa_values", "dfa_maxValue", "dfa_targetIndex")
NOT_IN_STORE = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson",
                "decoder_weights_dist", "vector")


@dataclass
class ExportResult:
    out: Path
    sae_id: str
    n_features: int
    files: list[Path]  # the batch files, in batch order
    seconds: float


# ---------------------------------------------------------------------------------------------- small pieces
def _round(x: float, decimals: int | None) -> float:
    return float(x) if decimals is None else float(np.round(float(x), decimals))


def _round_list(xs: Sequence[float], decimals: int | None) -> list[float]:
    """numpy.round, as SAEDashboard's round_list (halves to even); floats out, never numpy scalars."""
    a = np.asarray(xs, dtype=np.float64)
    return (a if decimals is None else np.round(a, decimals)).tolist()


def bar_midpoints(lo: float, hi: float, n: int) -> list[float]:
    """Centres of n equal bins over [lo, hi] (SAEDashboard's histogram bar_values)."""
    step = (hi - lo) / n if n else 0.0
    return [lo + step * (i + 0.5) for i in range(n)]


def layer_of(hook: str) -> int | None:
    """blocks.9.hook_resid_post -> 9; None when the hook does not name a block."""
    m = re.match(r"^blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def set_name_of(sae_id: str) -> str:
    """A Neuronpedia source-set name (lowercase letters, digits, dashes) from a store SAE id."""
    return re.sub(r"[^a-z0-9]+", "-", sae_id.lower()).strip("-") or "saescope"


def feature_batches(indices: Sequence[int], per_batch: int) -> list[list[int]]:
    """Split like NeuronpediaRunner.get_feature_batches: numpy.array_split into ceil(n / per_batch) parts,
    so the first n % parts batches hold one feature more than the rest."""
    if per_batch < 1:
        raise UserError(f"features per batch must be >= 1, got {per_batch}")
    n = len(indices)
    parts = math.ceil(n / per_batch)
    if parts == 0:
        return []
    size, extra = divmod(n, parts)
    out, start = [], 0
    for b in range(parts):
        end = start + size + (1 if b < extra else 0)
        out.append(list(indices[start:end]))
        start = end
    return out


def parse_features(spec: str, d_sae: int) -> list[int]:
    """'0-127,300,512-1023' -> sorted unique indices (inclusive ranges), each checked against d_sae."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UserError(f"--features: cannot read {part!r}; use indices and inclusive ranges like 0-127,300")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi or hi >= d_sae:
            raise UserError(f"--features: {part!r} is outside 0-{d_sae - 1} (the SAE has {d_sae} features)")
        out.update(range(lo, hi + 1))
    return sorted(out)


# ---------------------------------------------------------------------------------------------- one feature
def _sequence(e: "Example", drop_bos: bool) -> tuple[list[str], list[float], int]:
    """(tokens, values, qualifying index) of a stored example, the leading BOS dropped as SAEDashboard does."""
    if drop_bos and e.pos > 0:
        return e.tokens[1:], e.acts[1:], e.pos - 1
    return list(e.tokens), list(e.acts), e.pos


def feature_activations(store: "Store", sae: "SAEInfo", f: "Feature", decimals: int | None = NEURONPEDIA.decimals
                        ) -> list[dict[str, Any]]:
    """The feature's examples as SAEDashboard activation records: the top examples (bin_min -1, bin_max the
    feature's max, bin_contains -1), then each interval group from the strongest down (its bounds, and its
    active tokens over the SAE's counted tokens)."""
    drop_bos = bool(sae.prepend_bos)
    n_counted = max(1, int(sae.n_counted))

    def record(e: "Example", lo: float, hi: float, contains: float) -> dict[str, Any]:
        tokens, values, q = _sequence(e, drop_bos)
        return {"bin_min": lo if isinstance(lo, int) else _round(lo, decimals), "bin_max": _round(hi, decimals),
                "bin_contains": contains, "tokens": tokens, "values": _round_list(values, decimals),
                "qualifying_token_index": q, **{k: list(v) if isinstance(v, tuple) else v for k, v in NEURONPEDIA.dfa_off}}

    top_min, top_contains = NEURONPEDIA.top_bin
    acts = [record(e, top_min, f.max_act, top_contains) for e in store.examples(sae.sae_id, f.index, "top")]
    for g in store.groups(sae.sae_id, f.index, "interval"):  # strongest interval first
        acts += [record(e, g.lo, g.hi, g.n_tokens / n_counted) for e in g.examples]
    return acts


def neuronpedia_feature(store: "Store", sae: "SAEInfo", f: "Feature", decimals: int | None = NEURONPEDIA.decimals
                        ) -> dict[str, Any]:
    """One feature in SAEDashboard's NeuronpediaDashboardFeature layout (the keys of FEATURE_KEYS, in order)."""
    live = f.n_active > 0
    values: dict[str, Any] = {k: [] for k in NOT_IN_STORE}  # what the store does not hold: SAEDashboard's empty lists
    values.update({
        "feature_index": int(f.index),
        "neg_str": [t for t, _ in f.logit_neg], "neg_values": _round_list([v for _, v in f.logit_neg], decimals),
        "pos_str": [t for t, _ in f.logit_pos], "pos_values": _round_list([v for _, v in f.logit_pos], decimals),
        "frac_nonzero": float(f.density),
        # a feature that never fired has no activation histogram (SAEDashboard writes empty lists then)
        "freq_hist_data_bar_values": _round_list(bar_midpoints(f.hist_lo, f.hist_hi, len(f.hist)), decimals) if live else [],
        "freq_hist_data_bar_heights": [int(h) for h in f.hist] if live else [],
        "logits_hist_data_bar_heights": [int(h) for h in f.logit_hist],
        "logits_hist_data_bar_values": _round_list(bar_midpoints(f.logit_hist_lo, f.logit_hist_hi, len(f.logit_hist)),
                                                   decimals),
        "n_prompts_total": int(sae.n_contexts), "n_tokens_in_prompt": int(sae.context_len), "dataset": sae.dataset,
        "activations": feature_activations(store, sae, f, decimals) if live else [],
    })
    out = {k: values[k] for k in FEATURE_KEYS}  # SAEDashboard's key order
    return out


def neuronpedia_api_feature(store: "Store", sae: "SAEInfo", f: "Feature") -> dict[str, Any]:
    """One feature as Neuronpedia's database rows name it (what its importer makes of a batch feature: camelCase
    Feature fields, Activation rows with maxValue/maxValueTokenIndex/minValue), unrounded. Served by the JSON
    API's /neuronpedia route."""
    d = neuronpedia_feature(store, sae, f, decimals=None)
    layer = layer_of(sae.hook)

    def activation(a: dict[str, Any]) -> dict[str, Any]:
        v = a["values"]
        top = max(range(len(v)), key=v.__getitem__) if v else 0
        return {"tokens": a["tokens"], "values": v, "maxValue": v[top] if v else 0.0, "maxValueTokenIndex": top,
                "minValue": min(v) if v else 0.0, "bin_min": a["bin_min"], "bin_max": a["bin_max"],
                "bin_contains": a["bin_contains"], "qualifying_token_index": a["qualifying_token_index"]}

    return {
        "modelId": sae.model_id, "layer": f"{layer if layer is not None else sae.hook}-{sae.sae_id}",
        "index": str(f.index), "sourceSetName": sae.sae_id, "hookName": sae.hook, "maxActApprox": f.max_act,
        **{k: d[k] for k in ("frac_nonzero", "pos_str", "pos_values", "neg_str", "neg_values",
                             "freq_hist_data_bar_heights", "freq_hist_data_bar_values",
                             "logits_hist_data_bar_heights", "logits_hist_data_bar_values")},
        "topkCosSimIndices": [j for j, _ in f.neighbours], "topkCosSimValues": [s for _, s in f.neighbours],
        "explanations": [{"description": e} for e in f.explanations],
        "activations": [activation(a) for a in d["activations"]],
    }


# ---------------------------------------------------------------------------------------------- the folder
def pick_sae(store: "Store", sae_id: str | None) -> "SAEInfo":
    """The SAE to export: the named one, or the only one; otherwise a ValueError listing the valid ids."""
    ids = [s.sae_id for s in store.saes()]
    if sae_id is None:
        if len(ids) == 1:
            return store.saes()[0]
        raise UserError(f"{store.path} holds {len(ids)} SAEs; choose one with --sae: {', '.join(ids) or '(none)'}")
    return store.require_sae(sae_id)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; give a folder path for the batch files")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; choose a new folder or pass --force to replace it")


def export_neuronpedia(store_path: Path | str, out: Path | str, sae_id: str | None = None, *,
                       features_per_batch: int = NEURONPEDIA.features_per_batch, features: Sequence[int] | None = None,
                       set_name: str | None = None, sae_id_suffix: str | None = None, model_id: str | None = None,
                       layer: int | None = None, decimals: int | None = NEURONPEDIA.decimals, force: bool = False,
                       progress: bool = True) -> ExportResult:
    """Write OUT/batch-<n>.json (plus run_settings.json and skipped_indexes.json, as the runner does) for one SAE.

    The folder is written next to OUT under a temporary name and renamed into place when complete; an existing
    non-empty OUT is refused unless force. `features` (default: all) selects a subset, split into batches the
    same way. Neuronpedia's source id becomes f"{layer}-{set_name}" (+ "__" + sae_id_suffix)."""
    import time

    from tqdm import tqdm

    from .store import Store

    t0 = time.perf_counter()
    out = Path(out)
    if features_per_batch < 1:
        raise UserError(f"--features-per-batch must be >= 1, got {features_per_batch}")
    _check_out(out, force)
    with Store(store_path) as store:
        sae = pick_sae(store, sae_id)
        layer = layer if layer is not None else layer_of(sae.hook)
        if layer is None:
            raise UserError(f"cannot read a layer number from the hook {sae.hook!r} (expected blocks.N.…); "
                             "pass --layer N")
        indices = list(range(sae.d_sae)) if features is None else sorted({int(i) for i in features})
        if not indices:
            raise UserError("no features selected to export")
        bad = [i for i in indices if not 0 <= i < sae.d_sae]
        if bad:
            raise UserError(f"feature {bad[0]} is outside 0-{sae.d_sae - 1} ({sae.sae_id} has {sae.d_sae} features)")
        batches = feature_batches(indices, features_per_batch)
        meta = {"model_id": model_id or sae.model_id, "layer": layer, "sae_set": set_name or set_name_of(sae.sae_id),
                "sae_id_suffix": sae_id_suffix}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            files = []
            with tqdm(total=len(indices), unit="feature", desc=f"export {sae.sae_id}", disable=not progress) as bar:
                for b, batch in enumerate(batches):
                    feats = []
                    for i in batch:
                        f = store.feature(sae.sae_id, i)
                        if f is None:
                            raise UserError(f"{store.path}: {sae.sae_id} has no row for feature {i}; the store is "
                                             "incomplete, rebuild it with `saescope precompute`")
                        feats.append(neuronpedia_feature(store, sae, f, decimals))
                        bar.update(1)
                    path = tmp / f"batch-{b}.json"
                    try:
                        text = json.dumps({**meta, "features": feats}, allow_nan=False)
                    except ValueError as err:  # NaN/inf in a stored number: refuse rather than write invalid JSON
                        raise UserError(f"batch {b} (features {batch[0]}-{batch[-1]}) holds a non-finite number; "
                                         f"the store may be damaged ({err})") from err
                    path.write_text(text, encoding="utf-8")
                    files.append(out / path.name)
            _write_json(tmp / "skipped_indexes.json", {"model_id": meta["model_id"], "layer": str(layer),
                                                       "sae_set": meta["sae_set"], "log_sparsity": None,
                                                       "skipped_indexes": []})
            _write_json(tmp / "run_settings.json", _run_settings(store, sae, meta, out, features_per_batch, indices))
            _replace_dir(tmp, out, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    secs = time.perf_counter() - t0
    log.info("wrote %d features of %s in %d batch files to %s (%.1f s)", len(indices), sae.sae_id, len(files), out, secs)
    return ExportResult(out=out, sae_id=sae.sae_id, n_features=len(indices), files=files, seconds=secs)


def _run_settings(store: "Store", sae: "SAEInfo", meta: dict, out: Path, per_batch: int, indices: list[int]) -> dict:
    """The runner's run_settings.json fields that have a saescope counterpart, plus where the data came from."""
    p = sae.params or {}
    return {
        "sae_set": meta["sae_set"], "np_set_name": meta["sae_set"], "np_sae_id_suffix": meta["sae_id_suffix"],
        "sae_path": sae.sae_path, "outputs_dir": str(out), "huggingface_dataset_path": sae.dataset,
        "n_prompts_total": sae.n_contexts, "n_tokens_in_prompt": sae.context_len,
        "n_features_at_a_time": per_batch, "n_quantiles": p.get("n_intervals"), "top_acts_group_size": p.get("top_k"),
        "quantile_group_size": p.get("per_interval"), "model_id": meta["model_id"], "layer": meta["layer"],
        "prepend_bos": sae.prepend_bos,
        "saescope": {"store": str(Path(store.path).resolve()), "sae_id": sae.sae_id, "created": sae.created,
                     "saescope_version": sae.saescope_version, "hook": sae.hook, "n_tokens": sae.n_tokens,
                     "n_counted": sae.n_counted, "features": len(indices), "logit_method": sae.logit_method},
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


def _replace_dir(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; an existing OUT (empty, or any with force) is moved aside first."""
    if out.exists():
        _check_out(out, force)  # it may have changed while we worked
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
