"""Loading a run's SAEs and model, with the checks that tie them together (d_in through `encode.check_d_in`, the one
such check, which the worker and the interventions call too; SAE ids; prepend_bos)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..config import DEFAULT
from ..embedded import MODEL_ID, resolve_model, resolve_sae
from ..encode import check_d_in
from ..errors import UserError
from ..models import HookedLM, load_model
from ..saes import SAE, load_sae
from .spec import PrecomputeSpec, SAESpec

SAE_ID = re.compile(r"[A-Za-z0-9._-]+")


@dataclass
class LoadedSAE:
    spec: SAESpec
    sae: SAE
    sae_id: str  # "" until name_saes
    hook: str
    path: str  # resolved SAE path (provenance)


def load_saes(specs: list[SAESpec]) -> list[LoadedSAE]:
    """The run's SAEs (on CPU), each with its resolved path and hook."""
    out = []
    for s in specs:
        path = str(resolve_sae(s.path))
        sae = load_sae(path, s.hook)
        out.append(LoadedSAE(s, sae, "", sae.cfg.hook_name, path))
    return out


def load_model_for(spec: PrecomputeSpec, loaded: list[LoadedSAE], dtype: str | None = None) -> HookedLM:
    """The run's model, with the SAEs moved to its device."""
    lm = load_model(resolve_model(spec.model), spec.device, dtype or spec.dtype)
    for x in loaded:
        x.sae.to(lm.device)
    return lm


def model_label(spec: PrecomputeSpec) -> str:
    return MODEL_ID if spec.model == DEFAULT else spec.model


def default_sae_id(model_label: str, hook: str, sae: SAE) -> str:
    base = f"{model_label.rstrip('/').split('/')[-1]}-{hook.removeprefix('blocks.')}-{sae.cfg.architecture}-{sae.cfg.d_sae}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).lower()


def check_and_name(spec: PrecomputeSpec, lm: HookedLM, loaded: list[LoadedSAE]) -> None:
    """d_in of every SAE against the model; each SAE's store id (given or derived), valid and unique."""
    label = model_label(spec)
    for x in loaded:
        check_d_in(lm, x.sae, x.hook, x.spec.path, spec.model)
        x.sae_id = x.spec.sae_id or default_sae_id(label, x.hook, x.sae)
        if not SAE_ID.fullmatch(x.sae_id):
            raise UserError(f"--sae-id {x.sae_id!r} may only hold letters, digits, '.', '_' and '-'")
    ids = [x.sae_id for x in loaded]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise UserError(f"two SAEs of this run would both be stored as {', '.join(dup)}; give each its own --sae-id")


def prepend_bos(spec: PrecomputeSpec, loaded: list[LoadedSAE]) -> bool:
    """--prepend-bos yes/no, or what the SAEs' configs agree on (auto)."""
    if spec.prepend_bos != "auto":
        return spec.prepend_bos == "yes"
    wants = {x.sae.cfg.prepend_bos for x in loaded}
    if len(wants) > 1:
        raise UserError("the SAEs of this run disagree on prepend_bos (their configs); they share one token "
                        "stream, so pass --prepend-bos yes or --prepend-bos no")
    return wants.pop()
