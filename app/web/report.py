"""`saescope export STORE --format html OUT/`: an evidence report that opens anywhere (issue 22).

A flat folder of static pages rendered with the dashboard's Jinja environment (app/web/templates.py: the same
autoescaping, token strips (tokens.strip_html), SVG plots (plots.histogram_svg) and macros as the live pages):

    index.html            the feature list with provenance and the store's verify badge, links to everything
    feature-<i>.html      one page per listed feature: stats, histograms, logit tables, top examples, samples
    checks-<name>.html    a `saescope check` run (its JSON copied alongside)
    diff-<name>.html      a `saescope diff` (diff.json and features.csv copied alongside)

No server, no network: the CSS is inlined, there is no script, every link is relative, and a Content-Security-Policy
meta tag (default-src 'none') keeps even a hostile token string from loading anything.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from saescope.precompute.checks.run import hash_path
from saescope.precompute.config import DIFF
from saescope.precompute.diff import read_diff
from saescope.precompute.errors import UserError
from saescope.precompute.export import _check_out, _replace_dir, pick_sae
from saescope.precompute.store import Store

from ..settings import SERVE
from .diff import NAME, checks_context, checks_dir, diff_context
from .templates import ENV, STATIC
from .tokens import vocab_html, window

LAYOUT = "report_base.html"
UTF8 = "utf-8"
FEATURE_PAGE = "report_feature.html"


def _render(template: str, ctx: dict[str, Any]) -> str:
    return ENV.get_template(template).render(ctx)


def export_html(store_path: Path | str, out: Path | str, sae_id: str | None = None, *,
                features: Sequence[int] | None = None, checks: Sequence[Path] | None = None, diff: Path | None = None,
                list_name: str | None = None, force: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    store_path, out = Path(store_path), Path(out)
    _check_out(out, force)
    runs = []
    for p in (checks if checks is not None else sorted(checks_dir(store_path).glob("*.json"))):
        p = Path(p)
        if not p.is_file():
            raise UserError(f"no check result {p}; `saescope check` writes STORE.checks/<name>.json")
        name = p.stem if NAME.fullmatch(p.stem) else "run"
        runs.append((name, json.loads(p.read_text(encoding=UTF8)), p))
    d = read_diff(diff) if diff is not None else None
    with Store(store_path) as store:
        sae = pick_sae(store, sae_id)
        diff_same_sae = d is not None and d.meta["sae"]["path"] == sae.sae_path
        if features is None:
            named: list[int] = []
            for _, run, _ in runs:
                for r in run["results"]:
                    if r["sae_id"] == sae.sae_id:
                        e = r["expected"]
                        named += e.get("features") or ([e["feature"]] if "feature" in e else [])
            if diff_same_sae:
                named += d.meta["up"][:10] + d.meta["down"][:10]
            features = list(dict.fromkeys(named)) or [r.index for r in store.features(
                sae.sae_id, sort="density", desc=True, limit=DIFF.html_features, dead=False)]
        listed = list(dict.fromkeys(int(f) for f in features))
        shown = set(listed)

        def href(f: int) -> str | None:
            return f"feature-{f}.html" if f in shown else None

        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        base = {"layout": LAYOUT, "report_css": (STATIC / "app.css").read_text(encoding=UTF8),
                "report_made": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "href": href}
        html = vocab_html(store, sae.model_key)
        special = frozenset(sae.params.get("special_token_ids", ()))
        rows = store.features_by_index(sae.sae_id, listed)
        pages = 0
        feats = {}
        for f in listed:
            feat = store.feature(sae.sae_id, f)
            if feat is None:
                continue
            feats[f] = feat
            ex = store.examples_by_kind(sae.sae_id, f, ("top", "interval"))
            groups = store.groups_by_kind(sae.sae_id, f, ("interval",), examples=ex)["interval"]
            ctx = {**base, "sae": sae, "f": feat,
                   "top": [window(e, SERVE.show_left, SERVE.show_right, html, special) for e in ex["top"]],
                   "groups": [(g, [window(e, SERVE.show_left, SERVE.show_right, html, special) for e in g.examples])
                              for g in groups]}
            (tmp / f"feature-{f}.html").write_text(_render(FEATURE_PAGE, ctx), encoding=UTF8)
            pages += 1
        check_links = []
        for name, run, src in runs:
            ctx = checks_context(run, lambda f, s: href(f) if s == sae.sae_id else None)
            (tmp / f"checks-{name}.html").write_text(_render("checks.html", {**base, **ctx, "name": name}),
                                                      encoding=UTF8)
            shutil.copyfile(src, tmp / f"checks-{name}.json")
            check_links.append((name, f"checks-{name}.html", run["ok"]))
            pages += 1
        diff_links = []
        if d is not None:
            name = d.path.name if NAME.fullmatch(d.path.name) else "diff"
            ctx = diff_context(d, href if diff_same_sae else (lambda f: None))
            shutil.copyfile(d.path / "diff.json", tmp / f"diff-{name}.json")
            shutil.copyfile(d.path / "features.csv", tmp / f"diff-{name}.csv")
            (tmp / f"diff-{name}.html").write_text(_render("diff.html", {
                **base, **ctx, "name": name, "json_url": f"diff-{name}.json", "csv_url": f"diff-{name}.csv"}),
                encoding=UTF8)
            diff_links.append((name, f"diff-{name}.html"))
            pages += 1
        items = [{**vars(rows[f]), "href": href(f), "hist": feats[f].hist, "hist_lo": feats[f].hist_lo,
                  "hist_hi": feats[f].hist_hi} for f in listed if f in rows and f in feats]
        (tmp / "index.html").write_text(_render("report_index.html", {
            **base, "sae": sae, "sae_hash": hash_path(sae.sae_path)["sha256"], "store_path": str(store_path),
            "list_name": list_name or f"{len(items)} features of {sae.sae_id}", "features": items,
            "checks": check_links, "diffs": diff_links}), encoding=UTF8)
        pages += 1
    size = sum(p.stat().st_size for p in tmp.iterdir())
    _replace_dir(tmp, out, force)
    return {"out": str(out), "pages": pages, "features": len(items), "bytes": size,
            "seconds": time.perf_counter() - t0}
