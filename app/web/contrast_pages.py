"""A stored contrast (`saescope contrast`, precompute/contrast.py): its page and its JSON twin."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

from ..errors import AppError, echo
from .cache import cacheable
from .pages import store_of
from .templates import page
from .tokens import vocab_html

router = APIRouter()


def _contrast_or_404(request: Request, sae_id: str, name: str):
    store = store_of(request)
    sae = store.require_sae(sae_id)
    found = store.contrast(sae_id, name)
    if found is None:
        have = store.contrasts(sae_id)
        raise AppError(f"{sae_id} has no stored contrast {echo(name)}; stored: {', '.join(have) or 'none'} "
                       f"(make one with `saescope contrast STORE --sae {sae_id} --a A.txt --b B.txt --name NAME`)", 404)
    return store, sae, found


@router.get("/sae/{sae_id}/contrast/{name}", response_class=HTMLResponse)
@cacheable
def contrast_page(request: Request, sae_id: str, name: str):
    store, sae, (run, feats, texts) = _contrast_or_404(request, sae_id, name)
    vocab = vocab_html(store, sae.model_key)
    text_html = {side: [Markup("".join(vocab[i] if 0 <= i < len(vocab) else "" for i in ids)) for ids in texts[side]]
                 for side in texts}
    rows = store.features_by_index(sae_id, [f.feature for side in feats.values() for f in side])
    return page(request, "contrast.html", {"sae": sae, "run": run, "feats": feats, "texts": text_html, "rows": rows})


@router.get("/api/saes/{sae_id}/contrast/{name}", summary="a stored contrast: ranked features of both sides, probes")
@cacheable
def api_contrast(request: Request, sae_id: str, name: str) -> dict:
    store, sae, (run, feats, texts) = _contrast_or_404(request, sae_id, name)
    return {"run": vars(run), "features": {s: [vars(f) for f in fs] for s, fs in feats.items()},
            "n_texts": {s: len(t) for s, t in texts.items()}}
