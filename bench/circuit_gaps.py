"""Where the graph's node estimates and the real ablations part, on the embedded default's 30 demo transcoders.

For each checked node (verify.py: top 10 by influence): `est` (the graph: linear, attention patterns and norm scales
frozen, error nodes fixed), `tc_live` (the transcoders' own model: attention and norms live, every MLP replaced by
transcoder(x) + that layer's error at the prompt held fixed, downstream features re-encoded by their TopK) and
`true` (the real model). |est - tc_live| is what linearisation and freezing cost, |tc_live - true| what the
transcoders' unexplained MLP output (fixed error nodes) costs. Also each layer's explained variance on the prompt.

Usage: python bench/circuit_gaps.py N_TOKENS [MAX_FEATURE_NODES]   (prints lines; minutes on 2 CPU cores)
"""
import json, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from dataclasses import replace
from saescope.precompute.circuits.transcoders import load_transcoders
from saescope.precompute.circuits.run import circuit
from saescope.precompute.circuits.verify import verify, _deltas, _run, _demeaned
from saescope.precompute.config import CIRCUIT
from saescope.precompute.data import demo_corpus
from saescope.precompute.embedded import resolve_model, demo_transcoder_dirs
from saescope.precompute.models import load_model, hook_site
lm = load_model(resolve_model("default"), "auto", "float32")
ts = load_transcoders([str(p) for p in demo_transcoder_dirs()], lm.n_layers)
with demo_corpus().open() as f:
    text = json.loads(next(f))["text"]
n = int(sys.argv[1]); nf = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
ids = [lm.tokenizer.bos_token_id or 0] + lm.tokenizer(text, add_special_tokens=False)["input_ids"][: n - 1]
cfg = replace(CIRCUIT, max_seconds=3600, max_feature_nodes=nf)
t = time.time(); r = circuit(lm, ts, ids, cfg=cfg, check=False); print("graph s", time.time() - t, "scores", r.scores, flush=True)
g, p = r.graph, r.pruned
tsd = ts.to(lm.dtype)
nodes, edges = verify(lm, ts, g, p, cfg)
# EV of each layer's transcoder on this prompt (positions 1..), real MLP in/out by own hooks
io = {}
hs = []
for l in range(lm.n_layers):
    mlp = hook_site(lm.layers[l], "hook_mlp_in", lm.model_type)[0]
    hs.append(mlp.register_forward_hook(lambda m, a, o, l=l: io.__setitem__(l, (a[0][0].detach(), o[0].detach()))))
with torch.no_grad():
    _run(lm, ids)
for h in hs: h.remove()
evs = []
err_share = []
for l in range(lm.n_layers):
    x, y = io[l]
    enc = tsd.encoders[l]
    rec = enc.encode(x) @ enc.W_dec[:, 0] + tsd.b_dec[l]
    x, y, rec = x[1:], y[1:], rec[1:]
    evs.append(float(1 - (y - rec).pow(2).sum() / (y - y.mean(0)).pow(2).sum()))
    err_share.append(float((y - rec).norm() / y.norm()))
print("EV per layer on this prompt (pos>=1):", [round(e, 2) for e in evs])
print("EV median", statistics.median(evs), "min", min(evs), "|err|/|mlp_out| median", statistics.median(err_share))
# tc-live model
def tclive(sub):
    hs = []
    for l in range(lm.n_layers):
        mlp = hook_site(lm.layers[l], "hook_mlp_in", lm.model_type)[0]
        def hook(m, a, o, l=l):
            x = a[0]
            enc = tsd.encoders[l]
            acts = enc.encode(x[0])
            if cfg.zero_bos: acts[0] = 0
            out = acts @ enc.W_dec[:, 0] + tsd.b_dec[l] + torch.as_tensor(g.errors[l], dtype=x.dtype)
            if cfg.zero_bos: out[0] = io[l][1][0]
            if l in sub:
                pp, v = sub[l]; out = out.clone(); out[pp] -= v
            return out[None]
        hs.append(mlp.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return _demeaned(_run(lm, ids), g.logit_tokens[0])
    finally:
        for h in hs: h.remove()
base_live = tclive({})
real_base = _demeaned(_run(lm, ids), g.logit_tokens[0])
print("base demeaned logit: real", real_base, "tc-live", base_live)
rows = []
for c in nodes:
    live = tclive(_deltas(g, tsd, c.node)) - base_live
    info = g.node(c.node)
    rows.append((info["kind"], info["layer"], info["pos"], round(c.estimate, 3), round(live, 3), round(c.true, 3), c.agree))
    print(rows[-1], flush=True)
gap_est_true = [abs(a[3] - a[5]) for a in rows]
gap_est_live = [abs(a[3] - a[4]) for a in rows]
gap_live_true = [abs(a[4] - a[5]) for a in rows]
print("median |est-true|", statistics.median(gap_est_true), "|est-tclive|", statistics.median(gap_est_live), "|tclive-true|", statistics.median(gap_live_true))
print("flagged", sum(not c.agree for c in nodes), "of", len(nodes))
