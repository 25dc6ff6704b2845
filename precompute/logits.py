"""Direct logit effects of each decoder direction, and nearest features by decoder cosine, in chunks.

logit effect of feature f = (W_dec[f] * g) @ W_U, where g is the final norm's elementwise gain. The norm's
data-dependent scale (1/rms) is left out, so values are effects up to one positive factor per token position;
the ranking of tokens is exact. The full (d_sae, vocab) matrix is never held: features go in chunks.
"""

from __future__ import annotations

import numpy as np
import torch

LOGIT_METHOD = ("W_dec[f] * final_norm_gain @ W_U (direct path; the final norm's gain is folded in, "
                "its per-token 1/rms scale is not, so values are relative; no logit soft-capping)")


@torch.no_grad()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, gain: torch.Tensor | None, n: int = 10, bins: int = 50,
                  chunk: int = 512) -> dict[str, np.ndarray]:
    """W_dec (d_sae, d), W_U (d, vocab), gain (d,) -> top/bottom n tokens and a histogram per feature."""
    d_sae = W_dec.shape[0]
    W = W_dec.float() * (gain.float() if gain is not None else 1.0)
    W_U = W_U.float()
    out = {"pos_ids": np.zeros((d_sae, n), np.int32), "pos_vals": np.zeros((d_sae, n), np.float32),
           "neg_ids": np.zeros((d_sae, n), np.int32), "neg_vals": np.zeros((d_sae, n), np.float32),
           "hist": np.zeros((d_sae, bins), np.int64), "hist_lo": np.zeros(d_sae, np.float32),
           "hist_hi": np.zeros(d_sae, np.float32), "mean": np.zeros(d_sae, np.float32)}
    for s in range(0, d_sae, chunk):
        L = W[s:s + chunk] @ W_U  # (c, vocab)
        top, bot = L.topk(n, dim=-1), (-L).topk(n, dim=-1)
        out["pos_ids"][s:s + chunk], out["pos_vals"][s:s + chunk] = top.indices.numpy(), top.values.numpy()
        out["neg_ids"][s:s + chunk], out["neg_vals"][s:s + chunk] = bot.indices.numpy(), (-bot.values).numpy()
        out["mean"][s:s + chunk] = L.double().mean(dim=-1).float().numpy()  # softmax ignores this shift
        lo, hi = L.aminmax(dim=-1)  # (c,)
        # bin index in place (L is not needed any more): fewer full-size temporaries
        L.sub_(lo[:, None]).mul_((bins / (hi - lo).clamp_min(1e-12))[:, None]).clamp_(0, bins - 1)
        idx = L.long()
        h = torch.zeros(L.shape[0], bins, dtype=torch.long).scatter_add_(1, idx, torch.ones_like(idx))
        out["hist"][s:s + chunk], out["hist_lo"][s:s + chunk], out["hist_hi"][s:s + chunk] = h.numpy(), lo.numpy(), hi.numpy()
    return out


@torch.no_grad()
def nearest_features(W_dec: torch.Tensor, n: int = 10, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Top-n other features by cosine similarity of decoder rows: (d_sae, n) ids and similarities."""
    Wn = W_dec.float() / W_dec.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d_sae = Wn.shape[0]
    n = min(n, d_sae - 1)
    ids, sims = np.zeros((d_sae, n), np.int32), np.zeros((d_sae, n), np.float32)
    for s in range(0, d_sae, chunk):
        S = Wn[s:s + chunk] @ Wn.T  # (c, d_sae)
        rows = torch.arange(S.shape[0])
        S[rows, rows + s] = -float("inf")
        t = S.topk(n, dim=-1)
        ids[s:s + chunk], sims[s:s + chunk] = t.indices.numpy(), t.values.numpy()
    return ids, sims
