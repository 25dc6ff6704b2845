"""Run a check file against a store's SAEs and a model: validate (no model), load, measure, keep the provenance."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..embedded import resolve_model
from ..errors import SaescopeError, UserError
from ..models import load_model
from ..saes import load_sae
from .kinds import CheckResult, SetActs, encode_set, run_ablation, run_fires, run_monitor, run_steering, token_ids
from .spec import CheckFile, load_check_file

log = logging.getLogger(__name__)

HASHED_MODEL_FILES = ("*.safetensors", "*.bin", "config.json", "tokenizer.json", "tokenizer_config.json")


@dataclass
class CheckRun:
    check_file: str
    store: str
    provenance: dict[str, Any]
    results: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> int:
        return sum(1 for r in self.results if not r.passed and r.error is None)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error is not None)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    def as_json(self) -> dict[str, Any]:
        return {"check_file": self.check_file, "store": self.store, "ok": self.ok, "tests": len(self.results),
                "failures": self.failures, "errors": self.errors, "seconds": self.seconds,
                "provenance": self.provenance, "results": [asdict(r) for r in self.results]}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(ref: str, patterns: tuple[str, ...] = ("*",)) -> dict[str, Any]:
    """sha256 of a local file, or of each matching file of a folder plus one digest over (name, digest) lines."""
    p = Path(ref)
    if p.is_file():
        d = sha256_file(p)
        return {"path": str(p), "sha256": d, "files": {p.name: d}}
    if not p.is_dir():
        return {"path": ref, "sha256": None, "files": {}, "note": "not a local path: no hash"}
    files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
    per = {f.name: sha256_file(f) for f in files}
    combined = hashlib.sha256("".join(f"{n}:{d}\n" for n, d in per.items()).encode()).hexdigest()
    return {"path": str(p), "sha256": combined, "files": per}


def run_checks(check_path: Path | str, store_path: Path | str, model: str | None = None, device: str = "cpu",
               dtype: str = "float32", progress: bool = True) -> CheckRun:
    """Validate the file against the store's SAE rows (before any model loads), then run every check."""
    from ..store import Store

    t0 = time.perf_counter()
    with Store(store_path) as store:
        rows = {s.sae_id: s for s in store.saes()}
    spec = load_check_file(check_path, {k: s.d_sae for k, s in rows.items()})
    used = list(dict.fromkeys(c.sae_id for c in spec.checks))
    store_models = {rows[s].model_path for s in used}
    if model is None and len(store_models) > 1:
        raise UserError(f"the checked SAEs were precomputed on different models ({', '.join(sorted(store_models))}); "
                        "run them in separate check files or pass --model")
    model_path = resolve_model(model) if model else store_models.pop()
    saes = {s: load_sae(rows[s].sae_path, rows[s].hook) for s in used}
    lm = load_model(model_path, device, dtype)
    for s in saes.values():
        s.to(lm.device)
    for c in spec.checks:  # target tokens need the tokenizer: checked before anything runs
        p = c.params
        if c.kind == "ablation":
            token_ids(lm, p.get("targets"), p.get("target_ids"), f"{spec.path} line {c.line}, check {c.name!r}")
        if c.kind == "steering" and p["expect"] == "prob_up":
            token_ids(lm, p.get("target"), p.get("target_ids"), f"{spec.path} line {c.line}, check {c.name!r}")
    prov = provenance(spec, store_path, rows, used, model_path, model, lm)
    run = CheckRun(str(spec.path), str(store_path), prov)
    run.results = _run_all(spec, lm, saes, progress)
    run.seconds = time.perf_counter() - t0
    return run


def _run_all(spec: CheckFile, lm, saes: dict, progress: bool) -> list[CheckResult]:
    from tqdm.auto import tqdm

    # one encoding pass per (SAE, set), watching the union of the features its checks name
    watch: dict[tuple[str, str], list[int]] = {}
    for c in spec.checks:
        if c.kind in ("fires", "monitor"):
            for s in c.sets():
                watch.setdefault((c.sae_id, s), [])
                watch[(c.sae_id, s)] = list(dict.fromkeys(watch[(c.sae_id, s)] + c.params["features"]))
    total = sum(len(spec.sets[s].texts) for (_, s) in watch)
    total += sum(len(spec.sets[c.params["prompts"]].texts) for c in spec.checks if c.kind in ("ablation", "steering"))
    bar = tqdm(total=total, unit="text", desc="checks", disable=not progress)
    cache: dict[tuple[str, str], SetActs] = {}

    def getter(sae_id: str):
        def get(set_name: str) -> SetActs:
            key = (sae_id, set_name)
            if key not in cache:
                cache[key] = encode_set(lm, saes[sae_id], spec.sets[set_name].texts, watch[key], spec.max_tokens,
                                        bar.update)
            return cache[key]
        return get

    out = []
    for c in spec.checks:
        bar.set_postfix_str(c.name[:40])
        t = time.perf_counter()
        try:
            if c.kind == "fires":
                r = run_fires(lm, c, getter(c.sae_id))
            elif c.kind == "monitor":
                r = run_monitor(lm, c, getter(c.sae_id))
            elif c.kind == "ablation":
                r = run_ablation(lm, saes[c.sae_id], c, spec.sets[c.params["prompts"]].texts, spec.max_tokens,
                                 bar.update)
            else:
                r = run_steering(lm, saes[c.sae_id], c, spec.sets[c.params["prompts"]].texts, spec.max_tokens,
                                 bar.update)
        except SaescopeError as err:  # the check could not run (a text too long for the model, ...): an error
            r = CheckResult(c.name, c.kind, c.sae_id, c.line, False, f"could not run: {err}", dict(c.params), {},
                            error=str(err))
        r.seconds = time.perf_counter() - t
        out.append(r)
    bar.close()
    return out


def provenance(spec: CheckFile, store_path, rows: dict, used: list[str], model_path: str, model_arg: str | None,
               lm) -> dict[str, Any]:
    """What the results rest on: the check file, model and SAE file hashes, each SAE's stored verify result."""
    store_model = {rows[s].model_path for s in used}
    return {
        "saescope_version": __version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "check_file": {"path": str(spec.path), "sha256": hashlib.sha256(spec.text.encode()).hexdigest()},
        "store": {"path": str(Path(store_path).resolve())},
        "model": {**hash_path(model_path, HASHED_MODEL_FILES), "name": lm.name, "device": lm.device,
                  "dtype": str(lm.dtype).removeprefix("torch."),
                  "same_as_store": model_arg is None or model_path in store_model},
        "saes": {s: {**hash_path(rows[s].sae_path), "hook": rows[s].hook, "d_sae": rows[s].d_sae,
                     "store_model": rows[s].model_path, "verify": rows[s].verify or {},
                     "verify_ok": bool(rows[s].verify.get("ok")) if rows[s].verify else None}
                 for s in used},
        "sets": {n: {"source": s.source, "n_texts": len(s.texts)} for n, s in spec.sets.items()},
    }
