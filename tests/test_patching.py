"""Activation patching through SAE latents, against computations written here: the test's own hooks (the literal
reconstruction-plus-error formula), torch.autograd through the test's own differentiable splice, the plain model."""

from __future__ import annotations

import pytest
import torch

from saescope.precompute import interventions as iv
from saescope.precompute.config import LIMITS
from saescope.precompute.errors import UserError
from saescope.precompute.interventions.patching import Metric, Patch, patch, run_patched
from tests.test_intervene import default_lm, demo_sae, make_sae, module_for, one_thread, plain_logits, tiny  # noqa: F401


def prompts(n: int, seed: int, vocab: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (n,), generator=g)
    corrupted = clean.clone()
    corrupted[2] = (clean[2] + 7) % vocab  # one token changed, like "Paris" -> "Rome"
    corrupted[5] = (clean[5] + 11) % vocab
    corrupted[n - 2] = (clean[n - 2] + 13) % vocab
    return clean, corrupted


def metric_value(logits: torch.Tensor, m: Metric) -> float:
    lp = torch.log_softmax(logits.double(), -1)
    return float(lp[m.target]) if m.kind == "logprob" else float(logits[m.target] - logits[m.other])


def own_run(lm, family, sae, base, replace_fn) -> torch.Tensor:
    """Logits at the last position of `base` with x at the SAE's hook replaced by replace_fn(x) (a hook of this file)."""
    layer, kind = int(sae.cfg.hook_name.split(".")[1]), sae.cfg.hook_name.split(".")[2]
    mod = module_for(lm, family, layer, kind)
    hd = mod.register_forward_hook(
        lambda _m, _a, out: (replace_fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace_fn(out))
    try:
        return plain_logits(lm, base)[-1]
    finally:
        hd.remove()


def hook_act(lm, sae, ids) -> torch.Tensor:
    return lm.activations(ids[None], sae.cfg.hook_name)[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["logprob", "logit_diff"])
def test_patching_against_own_hooks_and_autograd(tiny, family, kind):
    lm = tiny(family)
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post", seed=3, dec=3.0)
    clean, corrupted = prompts(10, seed=1)
    top = plain_logits(lm, clean)[-1].topk(2).indices.tolist()
    m = Metric("logprob", top[0]) if kind == "logprob" else Metric("logit_diff", top[0], top[1])
    r = patch(lm, sae, clean, corrupted, m, n_features=4)
    x_b, x_s = hook_act(lm, sae, clean), hook_act(lm, sae, corrupted)
    z_b, z_s = sae.encode(x_b).detach(), sae.encode(x_s).detach()
    err_b = (x_b - sae.decode(z_b)).detach()
    assert r.base_metric == pytest.approx(metric_value(plain_logits(lm, clean)[-1], m), abs=1e-5)
    assert r.source_metric == pytest.approx(metric_value(plain_logits(lm, corrupted)[-1], m), abs=1e-5)
    assert abs(r.source_metric - r.base_metric) > 1e-3

    # every latent and the error term at every position: exactly the corrupted run
    assert r.all_with_error == pytest.approx(r.source_metric, abs=1e-4)
    # every latent without the error term: the corrupted latents decoded plus the clean error term (own hook)
    want = metric_value(own_run(lm, family, sae, clean, lambda x: (sae.decode(z_s) + err_b)[None]), m)
    assert r.all_latents == pytest.approx(want, abs=1e-4)

    # per position: every latent at position t alone (own hook)
    for e in r.per_position:
        def one(x, t=e.key):
            x = x.clone()
            x[0, t] = sae.decode(z_s[t]) + err_b[t]
            return x
        assert e.metric == pytest.approx(metric_value(own_run(lm, family, sae, clean, one), m), abs=1e-4)
        assert e.fraction == pytest.approx(e.change / (r.source_metric - r.base_metric), rel=1e-9)
    # per feature (at every position) and single cells, own hook
    W = sae.W_dec.detach()
    for j, f in enumerate(r.features):
        def feat(x, f=f):
            return x + (z_s[:, f] - z_b[:, f])[:, None] * W[f]
        assert r.per_feature[j].metric == pytest.approx(metric_value(own_run(lm, family, sae, clean, feat), m), abs=1e-4)
        for i, t in enumerate(r.positions[:3]):
            def cell(x, f=f, t=t):
                x = x.clone()
                x[0, t] += (z_s[t, f] - z_b[t, f]) * W[f]
                return x
            got = r.cells[i][j]
            assert got == pytest.approx(metric_value(own_run(lm, family, sae, clean, cell), m) - r.base_metric,
                                        abs=1e-4)

    # the estimate: (z_src - z_b) * d metric / d z_b from torch.autograd through this file's own splice
    zleaf = z_b.clone().requires_grad_(True)
    layer = module_for(lm, family, 1, "hook_resid_post")

    def splice(_m, _a, out):
        new = sae.decode(zleaf)[None] + err_b[None]
        return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
    hd = layer.register_forward_hook(splice)
    try:
        logits = lm.model(input_ids=clean[None]).logits[0, -1].float()
    finally:
        hd.remove()
    mv = torch.log_softmax(logits, -1)[m.target] if kind == "logprob" else logits[m.target] - logits[m.other]
    (g,) = torch.autograd.grad(mv, [zleaf])
    est = ((z_s - z_b) * g).detach()  # (T, d_sae)
    torch.testing.assert_close(torch.tensor(r.cell_estimates), est[:, r.features], rtol=1e-4, atol=1e-6)
    for e in r.per_position:
        assert e.estimate == pytest.approx(float(est[e.key].sum()), rel=1e-4, abs=1e-6)
    # the heatmap's features are the largest estimates
    assert r.features == est.abs().amax(0).topk(4).indices.tolist()


def test_patching_nothing_changes_nothing(tiny):
    lm = tiny("llama")
    sae = make_sae("standard", "constant_norm_rescale", "blocks.1.hook_resid_post", seed=4, dec=3.0)
    clean, corrupted = prompts(9, seed=2)
    m = Metric("logprob", 17)
    pairs = [(t, t) for t in range(9)]
    got = run_patched(lm, sae, clean, corrupted, pairs, [Patch(), Patch(((3, ()),))], m, 8)
    want = float(torch.log_softmax(plain_logits(lm, clean)[-1], -1)[17])
    assert got[0] == want and got[1] == want  # bit for bit
    # the other direction and chosen features: every chosen latent at every position with the error = corrupted run
    r = patch(lm, sae, clean, corrupted, m, direction="clean_into_corrupted", features=[1, 2, 3], patch_error=True)
    assert r.base_metric == pytest.approx(float(torch.log_softmax(plain_logits(lm, corrupted)[-1], -1)[17]), abs=1e-5)
    assert r.features == [1, 2, 3] and r.patched_features == [1, 2, 3]
    assert r.all_with_error == pytest.approx(r.source_metric, abs=1e-4)


def test_aligned_positions_of_prompts_of_different_lengths(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post", seed=3, dec=3.0)
    clean = torch.randint(3, 300, (8,), generator=torch.Generator().manual_seed(5))
    corrupted = torch.cat([clean[:3], torch.tensor([99, 98]), clean[3:]])  # two tokens inserted
    align = [(t, t) for t in range(3)] + [(t, t + 2) for t in range(3, 8)]
    m = Metric("logprob", 42)
    r = patch(lm, sae, clean, corrupted, m, align=align, n_features=3)
    assert r.positions == list(range(8)) and r.source_positions == [0, 1, 2, 5, 6, 7, 8, 9]
    x_b, x_s = hook_act(lm, sae, clean), hook_act(lm, sae, corrupted)
    z_s, err_b = sae.encode(x_s).detach(), (x_b - sae.decode(sae.encode(x_b))).detach()
    e = r.per_position[4]

    def one(x):
        x = x.clone()
        x[0, 4] = sae.decode(z_s[6]) + err_b[4]
        return x
    assert e.metric == pytest.approx(metric_value(own_run(lm, "llama", sae, clean, one), m), abs=1e-4)
    assert r.source_metric == pytest.approx(metric_value(plain_logits(lm, corrupted)[-1], m), abs=1e-5)


def test_patching_on_the_embedded_default(default_lm, demo_sae):
    tok = default_lm.tokenizer
    enc = lambda s: torch.tensor([tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    clean, corrupted = enc("The capital of France is"), enc("The capital of Italy is")
    assert clean.numel() == corrupted.numel()
    paris, rome = tok(" Paris", add_special_tokens=False)["input_ids"][0], tok(" Rome", add_special_tokens=False)["input_ids"][0]
    r = patch(default_lm, demo_sae, clean, corrupted, Metric("logit_diff", paris, rome), n_features=4)
    assert r.clean_metric > r.corrupted_metric  # Paris over Rome after France, less so after Italy
    assert r.all_with_error == pytest.approx(r.corrupted_metric, abs=2e-3)
    # the changed token's position carries most of the effect
    changed = int((clean != corrupted).nonzero()[0])
    best = max(r.per_position, key=lambda e: abs(e.change))
    assert best.key in (changed, clean.numel() - 1)


def test_bad_patching_input_names_the_limit(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    clean, corrupted = prompts(6, seed=0)
    m = Metric("logprob", 3)
    cases = [
        (lambda: patch(lm, sae, clean, corrupted[:5], m), r"clean prompt has 6 tokens and the corrupted one 5: .*aligned"),
        (lambda: patch(lm, sae, clean, corrupted, m, direction="sideways"), r"unknown direction 'sideways'; valid"),
        (lambda: patch(lm, sae, clean, corrupted, Metric("prob", 3)), r"unknown metric 'prob'; valid: logprob, logit_diff"),
        (lambda: patch(lm, sae, clean, corrupted, Metric("logit_diff", 3)), r"needs a second token"),
        (lambda: patch(lm, sae, clean, corrupted, Metric("logprob", 300)), r"target token id 300 is out of range"),
        (lambda: patch(lm, sae, clean, corrupted, m, features=list(range(LIMITS.max_patch_features + 1))),
         rf"{LIMITS.max_patch_features + 1} features given; the limit is {LIMITS.max_patch_features}"),
        (lambda: patch(lm, sae, clean, corrupted, m, align=[(0, 9)]), r"corrupted position 9 is out of range"),
        (lambda: patch(lm, sae, clean, corrupted, m, positions=[7]), r"position 7 is out of range"),
        (lambda: patch(lm, sae, clean, corrupted, m, align=[(0, 0)], positions=[3]), r"position 3 is not patchable"),
        (lambda: patch(lm, sae, clean, corrupted, m, features=[64]), r"feature 64 is out of range; allowed: 0\.\.63"),
        (lambda: patch(lm, sae, clean, corrupted, m, features=[]), r"features is empty: give at least one feature"),
        (lambda: patch(lm, sae, clean, corrupted, m, positions=[]), r"positions is empty: give at least one base"),
    ]
    for call, msg in cases:
        with pytest.raises(UserError, match=msg):  # the project's bad-input error (a ValueError), never a bare one
            call()


def test_empty_feature_list_is_a_user_error_not_an_index_error(tiny):
    """features=[] once reached torch.tensor([]) (a float tensor) as the heatmap's column index: an IndexError that
    the worker turned into a 500 and a reset connection. The library itself refuses it, and a one-feature list
    (the smallest valid one) still runs."""
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    clean, corrupted = prompts(6, seed=0)
    m = Metric("logprob", 3)
    with pytest.raises(UserError, match="features is empty") as err:
        patch(lm, sae, clean, corrupted, m, features=[])
    assert not isinstance(err.value, IndexError)
    r = patch(lm, sae, clean, corrupted, m, features=[5])
    assert r.features == [5] and r.patched_features == [5] and len(r.cells) == len(r.positions)
    assert all(len(row) == 1 for row in r.cells)
