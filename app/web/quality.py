"""The SAE quality metrics on pages: the home page's table of every SAE (sorted on the server), its two plots,
and the JSON model. Numbers come from the store's quality table (precompute/quality.py defines them)."""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup
from pydantic import Field, create_model

from saescope.precompute.store import Store
from saescope.precompute.store.schema import QUALITY

from ..errors import AppError
from .plots import scatter_svg

# (column, header, what it is, which way is better) in table order
COLUMNS = (
    ("l0", "L0", "mean active features per token", "low"),
    ("explained_variance", "explained var.", "1 - E||x - x̂||² / total variance of x", "high"),
    ("ce_loss_score", "CE loss score", "(CE_ablated - CE_sae) / (CE_ablated - CE_orig); 1 = no loss", "high"),
    ("kl_div_score", "KL score", "(KL_ablated - KL_sae) / KL_ablated", "high"),
    ("ce_loss_with_sae", "CE with SAE", "next-token cross-entropy with the reconstruction spliced in", "low"),
    ("ce_loss_without_sae", "CE orig.", "next-token cross-entropy of the model", None),
    ("mse", "MSE", "mean ||x - x̂||² per token", "low"),
    ("cossim", "cos", "mean cosine of x and x̂", "high"),
    ("l2_ratio", "L2 ratio", "mean ||x̂|| / ||x||", None),
    ("relative_reconstruction_bias", "rel. bias", "E||x̂||² / E<x, x̂> (1 = unbiased)", None),
    ("l1", "L1", "mean sum of |activations| per token", None),
    ("frac_alive", "alive", "share of features active on some eval token", "high"),
    ("freq_over_1_percent", "> 1%", "share of features with density > 1%", "low"),
    ("freq_over_10_percent", "> 10%", "share of features with density > 10%", "low"),
    ("normalized_freq_over_1_percent", "act. > 1%", "share of all activations from features with density > 1%", "low"),
    ("average_max_decoder_cosine_sim", "max dec. cos", "mean over features of the largest decoder cosine", "low"),
)
SORTS = ("sae_id",) + tuple(c[0] for c in COLUMNS)

# the JSON twin of a quality row: every column of the store's quality table, described by its spec
QualityOut = create_model("QualityOut", **{c.name: (c.py | None, Field(None, description=c.doc))
                                           for c in QUALITY.cols})


@dataclass
class QualityTable:
    rows: list  # store Quality rows, sorted
    sort: str
    order: str
    columns: tuple = COLUMNS
    plots: tuple[Markup, ...] = ()


def quality_table(store: Store, sort: str = "sae_id", order: str = "asc") -> QualityTable:
    """Every SAE's quality row, sorted by `sort` (missing values last), with the L0 plots."""
    if sort not in SORTS:
        raise AppError(f"qsort must be one of {', '.join(SORTS)}", 422)
    if order not in ("asc", "desc"):
        raise AppError("qorder must be asc or desc", 422)
    rows = list(store.quality().values())
    have = [r for r in rows if getattr(r, sort) is not None]
    have.sort(key=lambda r: getattr(r, sort), reverse=order == "desc")
    rows = have + [r for r in rows if getattr(r, sort) is None]
    pts = lambda y: [(r.l0, getattr(r, y), r.sae_id) for r in rows]  # noqa: E731
    plots = (scatter_svg(pts("explained_variance"), "L0", "explained variance"),
             scatter_svg(pts("ce_loss_score"), "L0", "CE loss score")) if rows else ()
    return QualityTable(rows, sort, order, plots=plots)


def next_order(t: QualityTable, col: str) -> str:
    """Clicking the current column flips it; a new one starts with its better end first (ids: ascending)."""
    if col == t.sort:
        return "asc" if t.order == "desc" else "desc"
    better = next((c[3] for c in COLUMNS if c[0] == col), None)
    return "asc" if col == "sae_id" or better == "low" else "desc"
