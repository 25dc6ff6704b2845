"""The SAE splice (steering, ablation, attribution) against independent computations on real models.

Independent references used here: the plain model's logits, a forward hook written in this file (own module
paths per family, the literal reconstruction-plus-error formula), central finite differences in float64, and
transformers' own `model.generate`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from saescope.precompute import interventions as iv
from saescope.precompute.config import EMBEDDED, LIMITS
from saescope.precompute.models import HookedLM
from saescope.precompute.saes import REGISTRY, SAE, SAEConfig, load_sae

FAMILIES = ["gpt2", "neox", "llama", "gemma2"]
KINDS = ["hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out"]
ARCHS = ["topk", "jumprelu", "gated", "standard"]
NORMS = ["none", "constant_norm_rescale", "layer_norm"]


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models and short prompts: one intra-op thread is as fast, and on a busy 2-core machine far faster
    (OpenMP threads spin against other processes). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_family_dir):
    """family -> HookedLM (float32, no tokenizer), loaded once."""
    from transformers import AutoModelForCausalLM

    made: dict[str, HookedLM] = {}

    def get(family: str) -> HookedLM:
        if family not in made:
            model = AutoModelForCausalLM.from_pretrained(tiny_family_dir(family), dtype=torch.float32)
            made[family] = HookedLM(model, None, family, "cpu")
        return made[family]

    return get


@pytest.fixture(scope="module")
def default_lm(default_model_dir) -> HookedLM:
    from saescope.precompute.models import load_model

    lm = load_model(str(default_model_dir), device="cpu", dtype="float32")
    torch.set_num_threads(1)  # load_model sets the thread count from SAESCOPE_THREADS / the cores
    return lm


@pytest.fixture(scope="module")
def demo_sae() -> SAE:
    return load_sae(EMBEDDED.sae_dir)


def make_sae(arch: str, norm: str, hook: str, d_in: int = 32, d_sae: int = 64, seed: int = 0, dec: float = 0.3) -> SAE:
    """A random SAE whose features respond to the tiny models' activations (about a third fire per token)."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=8 if arch == "topk" else None, hook_name=hook,
                    normalize_activations=norm)
    sae = REGISTRY[arch](cfg)
    in_scale = 1.0 if norm != "none" else 1.0 / 0.3  # unnormalised tiny activations have norms around 0.3..3
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        sae.W_enc.mul_(in_scale / math.sqrt(d_in))
        sae.W_dec.mul_(dec / math.sqrt(d_in))
        sae.b_dec.mul_(0.02)
        if sae.uses_b_enc:
            sae.b_enc.mul_(0.1)
        for name in ("threshold",):
            if hasattr(sae, name):
                getattr(sae, name).abs_().mul_(0.2)
        for name in ("b_gate", "b_mag", "r_mag"):
            if hasattr(sae, name):
                getattr(sae, name).mul_(0.1)
    return sae.eval()


def prompt_ids(n: int = 12, seed: int = 0, vocab: int = 300) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def plain_logits(lm: HookedLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(input_ids=ids[None]).logits[0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def module_for(lm: HookedLM, family: str, layer: int, kind: str) -> torch.nn.Module:
    """The module for a hook, spelled out per family (independent of precompute.models)."""
    m = lm.model
    blocks = {"gpt2": lambda: m.transformer.h, "neox": lambda: m.gpt_neox.layers,
              "llama": lambda: m.model.layers, "gemma2": lambda: m.model.layers}[family]()
    block = blocks[layer]
    if kind in ("hook_resid_pre", "hook_resid_post"):
        return block
    names = {("gpt2", "hook_mlp_out"): "mlp", ("gpt2", "hook_attn_out"): "attn",
             ("neox", "hook_mlp_out"): "mlp", ("neox", "hook_attn_out"): "attention",
             ("llama", "hook_mlp_out"): "mlp", ("llama", "hook_attn_out"): "self_attn",
             ("gemma2", "hook_mlp_out"): "post_feedforward_layernorm",
             ("gemma2", "hook_attn_out"): "post_attention_layernorm"}
    return getattr(block, names[(family, kind)])


def reference_logits(lm: HookedLM, family: str, sae: SAE, ids: torch.Tensor, edit_fn) -> torch.Tensor:
    """Logits with x at the SAE's hook replaced by the literal formula
    unnorm(decode(edit_fn(z))) + (x - unnorm(decode(z))), z = encode(x); unnorm written out here."""
    layer, kind = int(sae.cfg.hook_name.split(".")[1]), sae.cfg.hook_name.split(".")[2]
    mod = module_for(lm, family, layer, kind)

    def unnorm(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mode = sae.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return y * x.norm(dim=-1, keepdim=True) / math.sqrt(x.shape[-1])
        if mode == "layer_norm":
            return y * (x.std(dim=-1, keepdim=True) + 1e-5) + x.mean(dim=-1, keepdim=True)
        return y

    def replace(x: torch.Tensor) -> torch.Tensor:
        z = sae.encode(x)
        return unnorm(sae.decode(edit_fn(z.clone(), x)), x) + (x - unnorm(sae.decode(z), x))

    if kind == "hook_resid_pre":
        h = mod.register_forward_pre_hook(lambda _m, args: (replace(args[0]),) + tuple(args[1:]))
    else:
        h = mod.register_forward_hook(
            lambda _m, _a, out: (replace(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace(out))
    try:
        return plain_logits(lm, ids)
    finally:
        h.remove()


def most_active(sae: SAE, lm: HookedLM, ids: torch.Tensor, n: int = 1) -> list[int]:
    z = sae.encode(lm.activations(ids[None], sae.cfg.hook_name))[0]  # (T, d_sae)
    return (z > 0).float().sum(0).mul(1e3).add(z.sum(0)).topk(n).indices.tolist()


# ------------------------------------------------------------------ splice identity
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_splice_without_edits_leaves_logits_unchanged(tiny, family, kind):
    i, j = FAMILIES.index(family), KINDS.index(kind)
    arch, norm = ARCHS[(i + j) % 4], NORMS[(i + 2 * j) % 3]  # every family meets every normalisation
    lm = tiny(family)
    hook = f"blocks.1.{kind}"
    sae = make_sae(arch, norm, hook, seed=i * 4 + j)
    ids = prompt_ids(12, seed=i)
    ref = plain_logits(lm, ids)
    # the applied splice x + scale * (z_edit - z) @ W_dec is the identity bit for bit without edits
    assert torch.equal(iv.spliced_logits(lm, sae, ids), ref)
    # the literal reconstruction + error form (what attribution differentiates) agrees to fp32 rounding
    logits, z, err = iv.forward_from_latents(lm, sae, ids[None])
    assert rel(logits[0].float(), ref) <= 1e-5, (arch, norm)
    # and it saw the activation HookedLM defines for this hook name
    want = sae.encode(lm.activations(ids[None], hook))
    torch.testing.assert_close(z, want, rtol=1e-5, atol=1e-6)
    # the hook is live: ablating an active feature changes the output
    f = most_active(sae, lm, ids)[0]
    assert not torch.equal(iv.spliced_logits(lm, sae, ids, [iv.Edit(f, "ablate")]), ref)


def test_splice_identity_on_the_embedded_default(default_lm, demo_sae):
    ids = default_lm.tokenizer("The quick brown fox jumps over the lazy dog. It was", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([default_lm.tokenizer.bos_token_id] + ids)
    ref = plain_logits(default_lm, ids)
    assert torch.equal(iv.spliced_logits(default_lm, demo_sae, ids), ref)
    logits, _, err = iv.forward_from_latents(default_lm, demo_sae, ids[None])
    assert rel(logits[0].float(), ref) <= 1e-5
    assert float(err.norm()) > 0  # the error term is real and carried through


def test_a_splice_only_acts_in_the_thread_that_installed_it(tiny):
    import threading

    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    ids = prompt_ids(10)
    f = most_active(sae, lm, ids)[0]
    ref = plain_logits(lm, ids)
    seen: list[torch.Tensor] = []
    with iv.splice(lm, sae, [[iv.Edit(f, "ablate")]]):
        other = threading.Thread(target=lambda: seen.append(plain_logits(lm, ids)))
        other.start()
        other.join()
        here = plain_logits(lm, ids)
    assert torch.equal(seen[0], ref) and not torch.equal(here, ref)
    assert torch.equal(plain_logits(lm, ids), ref)  # removed on exit


# ------------------------------------------------------------------ edits against a hook written here
CASES = [("llama", "hook_resid_post", "none", "topk"), ("gemma2", "hook_mlp_out", "constant_norm_rescale", "standard"),
         ("gpt2", "hook_attn_out", "layer_norm", "jumprelu"), ("neox", "hook_resid_pre", "none", "gated")]


@pytest.mark.parametrize("family,kind,norm,arch", CASES)
def test_edits_equal_an_independent_hook(tiny, family, kind, norm, arch):
    lm = tiny(family)
    sae = make_sae(arch, norm, f"blocks.1.{kind}", seed=7)
    ids = prompt_ids(14, seed=3)
    f, g, h = most_active(sae, lm, ids, 3)

    # ablation of one feature everywhere: per-token change in log p(next token) and KL(clean || edited)
    res = iv.ablation_effects(lm, sae, ids.tolist(), [iv.Edit(f, "ablate")])

    def ablate_f(z, _x):
        z[..., f] = 0
        return z

    clean = torch.log_softmax(plain_logits(lm, ids), -1)  # (T, vocab)
    edited = torch.log_softmax(reference_logits(lm, family, sae, ids, ablate_f), -1)
    nxt = ids[1:, None]
    want_dlp = (edited[:-1].gather(-1, nxt) - clean[:-1].gather(-1, nxt))[:, 0]
    want_kl = (clean.exp() * (clean - edited)).sum(-1)
    assert res.delta_logprob[-1] is None and len(res.kl) == len(ids)
    torch.testing.assert_close(torch.tensor(res.delta_logprob[:-1]), want_dlp, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(torch.tensor(res.kl), want_kl.clamp_min(0), rtol=1e-3, atol=2e-6)
    assert max(abs(v) for v in res.delta_logprob[:-1]) > 1e-4  # the ablation did something measurable
    z = sae.encode(lm.activations(ids[None], sae.cfg.hook_name))[0]
    torch.testing.assert_close(torch.tensor(res.feature_acts[f]), z[:, f], rtol=1e-5, atol=1e-6)

    # clamp at chosen positions, then a raw-space addition of a decoder row from position 3 on
    edits = [iv.Edit(g, "clamp", 2.5, (2, 5, 9)), iv.Edit(h, "add", 3.0, tuple(range(3, len(ids))))]

    def clamp_g(z, _x):
        z[..., [2, 5, 9], g] = 2.5
        return z

    def both(z, x):  # add 3 * W_dec[h] in raw space == z_h += 3 / scale in latent space
        z = clamp_g(z, x)
        scale = {"constant_norm_rescale": lambda: x.norm(dim=-1) / math.sqrt(x.shape[-1]),
                 "layer_norm": lambda: x.std(dim=-1) + 1e-5, "none": lambda: torch.ones(x.shape[:-1])}[norm]()
        z[..., 3:, h] += 3.0 / scale[..., 3:]
        return z

    got = iv.spliced_logits(lm, sae, ids, edits)
    assert rel(got, reference_logits(lm, family, sae, ids, both)) <= 1e-4
    # positions before the first edited position are untouched (causal model, exact splice)
    assert torch.equal(got[:2], plain_logits(lm, ids)[:2])


# ------------------------------------------------------------------ attribution
def fd_logprob(lm64: HookedLM, family: str, sae64: SAE, ids: torch.Tensor, target: int, t: int, f: int,
               h: float) -> float:
    """Central difference of log p(target at the last position) in z[t, f], float64, error term fixed: moving z[t,f]
    by d moves x at position t by d * scale_t * W_dec[f] (decode is linear; scale from the original x).

    Llama's and Gemma-2's RMSNorm compute in float32 even in a float64 copy, so the step is not tiny (rounding
    noise would dominate) and Richardson extrapolation removes the step's h^2 error."""
    layer, kind = int(sae64.cfg.hook_name.split(".")[1]), sae64.cfg.hook_name.split(".")[2]
    mod = module_for(lm64, family, layer, kind)

    def run(d: float) -> float:
        def hook(_m, _a, out):
            x = out[0] if isinstance(out, tuple) else out
            x = x.clone()
            s = x[0, t].norm() / math.sqrt(x.shape[-1]) if sae64.cfg.normalize_activations == "constant_norm_rescale" \
                else 1.0
            x[0, t] += d * s * sae64.W_dec[f]
            return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x
        hd = mod.register_forward_hook(hook)
        try:
            with torch.no_grad():
                lg = lm64.model(input_ids=ids[None]).logits[0, -1]
        finally:
            hd.remove()
        return float(torch.log_softmax(lg, -1)[target])

    def central(step: float) -> float:
        return (run(step) - run(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3  # Richardson: the h^2 term cancels


# decoder scale per family: effects well above the float32 norms' rounding, still close to linear over the step
@pytest.mark.parametrize("family,norm,dec", [("llama", "none", 1.0), ("gemma2", "constant_norm_rescale", 3.0)])
def test_attribution_equals_finite_differences(tiny, family, norm, dec):
    lm = tiny(family)
    sae = make_sae("standard", norm, "blocks.1.hook_resid_post", seed=11, dec=dec)
    ids = prompt_ids(10, seed=5)
    p = 8
    g = iv.latent_gradients(lm, sae, ids, position=p)
    assert g.target == int(plain_logits(lm, ids)[p].argmax())
    lm64 = HookedLM(copy.deepcopy(lm.model).double(), None, family, "cpu")
    sae64 = copy.deepcopy(sae).double()
    attr = g.attribution  # (p+1, d_sae)
    flat = attr.abs().flatten().topk(40).indices
    pairs, seen_t = [], set()
    for k in flat.tolist():  # the strongest (position, feature) pairs, at several positions
        t, f = divmod(k, attr.shape[1])
        if t not in seen_t:
            pairs.append((t, f))
            seen_t.add(t)
        if len(pairs) == 4:
            break
    assert len(pairs) == 4
    for t, f in pairs:
        fd = fd_logprob(lm64, family, sae64, ids[: p + 1], g.target, t, f, h=0.01)
        est = float(g.z[t, f]) * fd
        assert abs(float(attr[t, f]) - est) <= 1e-3 * abs(est), (t, f, float(attr[t, f]), est)

    # the ranked list aggregates the same matrix, and the true ablation effect matches a hook written here
    res = iv.attribute(lm, sae, ids, position=p, n_top=5, n_verify=3)
    total = attr.sum(0)
    assert [fa.feature for fa in res.features] == total.abs().topk(5).indices.tolist()
    for fa in res.features:
        assert fa.attribution == pytest.approx(float(total[fa.feature]), rel=1e-6)
        assert fa.best_position == int(attr[:, fa.feature].abs().argmax())
        assert fa.ablation_estimate == -fa.attribution
    for fa in res.features[:3]:
        def ablate(z, _x, f=fa.feature):
            z[..., f] = 0
            return z
        sub = ids[: p + 1]
        lp_clean = torch.log_softmax(plain_logits(lm, sub)[-1], -1)[res.target]
        lp_abl = torch.log_softmax(reference_logits(lm, family, sae, sub, ablate)[-1], -1)[res.target]
        assert fa.ablation_true == pytest.approx(float(lp_abl - lp_clean), rel=1e-3, abs=1e-5)
    assert all(fa.ablation_true is None for fa in res.features[3:])


# ------------------------------------------------------------------ steered generation
def test_zero_steering_gives_plain_greedy_generate(default_lm, demo_sae):
    tok = default_lm.tokenizer
    ids = [tok.bos_token_id] + tok("Once upon a time, in a small village,", add_special_tokens=False)["input_ids"]
    n = 12
    ref = default_lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
    out = iv.generate(default_lm, demo_sae, ids, [iv.Edit(100, "add", 0.0)], max_new_tokens=n)
    assert out.steered.ids == ref and out.default.ids == ref
    assert out.steered.text == tok.decode(ref)
    # the reported activations are what the SAE reads at the hook on the finished text
    full = torch.tensor([ids + out.steered.ids])
    z = demo_sae.encode(default_lm.activations(full, demo_sae.cfg.hook_name))[0, :, 100]  # (T + n,)
    got = torch.tensor([r[0] for r in out.prompt_acts] + [r[0] for r in out.steered.feature_acts])
    torch.testing.assert_close(got, z, rtol=1e-3, atol=1e-3)


def test_zero_steering_on_tiny_gemma2_with_sliding_window(tiny):
    lm = tiny("gemma2")  # sliding_window 16 < prompt + new tokens
    sae = make_sae("topk", "none", "blocks.2.hook_mlp_out")
    ids = prompt_ids(10, seed=9)
    ref = lm.model.generate(ids[None], do_sample=False, max_new_tokens=14)[0, 10:].tolist()
    out = iv.generate(lm, sae, ids, [iv.Edit(3, "add", 0.0), iv.Edit(4, "add", 0.0, (20,))], max_new_tokens=14)
    assert out.steered.ids == ref and out.default.ids == ref


def test_steering_positions_count_into_the_new_tokens(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    ids = prompt_ids(8, seed=2)
    T, k = len(ids), 3
    edits = [iv.Edit(5, "add", 40.0, (T + k - 1,))]
    out = iv.generate(lm, sae, ids, edits, max_new_tokens=8, stop_at_eos=False)
    new = out.steered.ids
    # tokens predicted before the edited position are the default ones; after it the continuation changes
    assert new[:k] == out.default.ids[:k] and new != out.default.ids
    # the KV-cache run equals a full forward over the finished text with the same absolute positions
    full = iv.spliced_logits(lm, sae, ids.tolist() + new[:-1], edits)
    assert full[T - 1:].argmax(-1).tolist() == new
    lp = torch.log_softmax(full[T - 1:], -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(out.steered.logprobs), lp, rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_rows_do_not_share_randomness(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    ids = prompt_ids(8, seed=4)
    s = iv.Sampling(temperature=1.0, top_p=0.9, seed=3)
    edits = [iv.Edit(5, "add", 10.0)]
    a = iv.generate(lm, sae, ids, edits, max_new_tokens=10, sampling=s, stop_at_eos=False)
    b = iv.generate(lm, sae, ids, edits, max_new_tokens=10, sampling=s, stop_at_eos=False, batched=False)
    c = iv.generate(lm, sae, ids, edits, max_new_tokens=10, sampling=iv.Sampling(1.0, 0.9, 4), stop_at_eos=False)
    assert a.steered.ids == b.steered.ids and a.default.ids == b.default.ids
    assert (a.steered.ids, a.default.ids) != (c.steered.ids, c.default.ids)
    plain = iv.generate(lm, sae, ids, edits, max_new_tokens=10, sampling=s, stop_at_eos=False, with_default=False)
    assert plain.default is None and plain.steered.ids == a.steered.ids


def test_steering_with_a_feature_raises_the_token_it_promotes(default_lm, demo_sae):
    from saescope.precompute.logits import logit_effects

    sub = 512  # the first 512 features are plenty to find a strong one, and keep this fast
    eff = logit_effects(demo_sae.W_dec[:sub], default_lm.unembedding(), default_lm.final_norm_gain(), n=1)
    f = int(eff["pos_vals"][:, 0].argmax())
    token = int(eff["pos_ids"][f, 0])
    tok = default_lm.tokenizer
    ids = [tok.bos_token_id] + tok("I went to the store and bought", add_special_tokens=False)["input_ids"]
    clean = torch.log_softmax(iv.spliced_logits(default_lm, demo_sae, ids)[-1], -1)[token]
    steered = torch.log_softmax(iv.spliced_logits(default_lm, demo_sae, ids, [iv.Edit(f, "add", 10.0)])[-1], -1)[token]
    assert float(steered) > float(clean) + 1.0, (f, tok.decode([token]), float(clean), float(steered))


# ------------------------------------------------------------------ bad input
def test_bad_input_names_the_limit(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")  # 64 features
    ids = prompt_ids(6).tolist()
    E = iv.Edit
    cases = [
        (lambda: iv.generate(lm, sae, ids, [E(64, "add", 1.0)]), r"feature 64 is out of range; allowed: 0\.\.63"),
        (lambda: iv.generate(lm, sae, ids, [E(-1, "ablate")]), r"allowed: 0\.\.63"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", float("nan"))]), r"not finite; allowed: -1000\.\.1000"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", float("inf"))]), r"not finite"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "clamp", 1e6)]), r"too large; allowed: -1000\.\.1000"),
        (lambda: iv.generate(lm, sae, ids, [E(i, "add", 1.0) for i in range(LIMITS.max_edits + 1)]),
         rf"{LIMITS.max_edits + 1} edits given; the limit is {LIMITS.max_edits}"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", 1.0)], max_new_tokens=10_000),
         rf"max_new_tokens 10000 is out of range; allowed: 1\.\.{LIMITS.max_new_tokens}"),
        (lambda: iv.generate(lm, sae, [], [E(1, "add", 1.0)]), r"prompt is empty"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", 1.0)], max_new_tokens=60),  # tiny llama: 64 positions
         r"prompt \(6 tokens\) \+ max_new_tokens \(60\) is 66; the limit for llama is 64"),
        (lambda: iv.ablation_effects(lm, sae, [], [E(1)]), r"prompt is empty"),
        (lambda: iv.attribute(lm, sae, []), r"prompt is empty"),
        (lambda: iv.ablation_effects(lm, sae, [1] * 65, [E(1)]), r"65 tokens; the limit is 64"),
        (lambda: iv.ablation_effects(lm, sae, [1, 300], [E(1)]), r"token id 300 is outside the vocabulary; allowed: 0\.\.299"),
        (lambda: iv.ablation_effects(lm, sae, ids, []), r"no edits given"),
        (lambda: iv.ablation_effects(lm, sae, [1.5, 2.0], [E(1)]), r"token ids must be a flat list of integers"),
        (lambda: iv.ablation_effects(lm, sae, torch.ones(2, 3, dtype=torch.long), [E(1)]), r"one sequence"),
        (lambda: iv.ablation_effects(lm, sae, ids, [E(1, "boost", 1.0)]), r"unknown mode 'boost'; valid: ablate, clamp, add"),
        (lambda: iv.ablation_effects(lm, sae, ids, [E(1, "ablate", 0, (6,))]), r"position 6 is out of range; allowed: 0\.\.5"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", 1, (6 + 4,))], max_new_tokens=4), r"allowed: 0\.\.9"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", 1.0)], sampling=iv.Sampling(temperature=-1)),
         r"temperature -1 is out of range; allowed: 0 \(greedy\)\.\.10"),
        (lambda: iv.generate(lm, sae, ids, [E(1, "add", 1.0)], sampling=iv.Sampling(top_p=0)), r"top_p 0"),
        (lambda: iv.attribute(lm, sae, ids, position=6), r"position 6 is out of range; allowed: 0\.\.5"),
        (lambda: iv.attribute(lm, sae, ids, n_top=1000), r"n_top 1000 is out of range; allowed: 1\.\.100"),
        (lambda: iv.attribute(lm, sae, ids, target=300), r"target token id 300 is out of range; allowed: 0\.\.299"),
    ]
    for i, (call, msg) in enumerate(cases):
        with pytest.raises(ValueError, match=msg):
            call()
    assert LIMITS.max_abs_value == 1000.0 and LIMITS.max_n_top == 100  # the limits quoted above


# ------------------------------------------------------------------ steering methods (Neuronpedia's three)
def neuronpedia_steer(h: torch.Tensor, v: torch.Tensor, method: str, coeff: float, normalize: bool) -> torch.Tensor:
    """One feature's steering of h (..., d) written out as Neuronpedia's inference server does it: SIMPLE_ADDITIVE
    h + coeff * v (v / |v| first with normalize_steering); ORTHOGONAL_DECOMP h (I - P)^T + coeff * h P^T with the
    matrix P = v v^T / |v|^2; PROJECTION_CAP the projection on the unit vector capped from above at coeff."""
    v = v.double()
    if normalize:
        v = v / v.norm()
    h64 = h.double()
    if method == "add":
        out = h64 + coeff * v
    elif method == "orthogonal":
        P = torch.outer(v, v) / (v * v).sum()
        out = h64 @ (torch.eye(len(v), dtype=torch.float64) - P).T + coeff * (h64 @ P.T)
    else:
        u = v / v.norm()
        proj = h64 @ u
        out = h64 + (torch.minimum(proj, torch.tensor(coeff, dtype=torch.float64)) - proj)[..., None] * u
    return out.to(h.dtype)


def steered_reference_logits(lm: HookedLM, family: str | None, sae: SAE, ids: torch.Tensor,
                             steps: list[tuple[int, str, float, bool]]) -> torch.Tensor:
    """Logits with a forward hook written here (module paths per family; the embedded default is a Llama)."""
    layer, kind = int(sae.cfg.hook_name.split(".")[1]), sae.cfg.hook_name.split(".")[2]
    mod = module_for(lm, family or "llama", layer, kind)

    def replace(x):
        for f, method, c, norm in steps:
            x = neuronpedia_steer(x, sae.W_dec[f].detach(), method, c, norm)
        return x

    if kind == "hook_resid_pre":
        hd = mod.register_forward_pre_hook(lambda _m, args: (replace(args[0]),) + tuple(args[1:]))
    else:
        hd = mod.register_forward_hook(
            lambda _m, _a, out: (replace(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else replace(out))
    try:
        return plain_logits(lm, ids)
    finally:
        hd.remove()


METHOD_CASES = [("add", 4.0, False), ("add", 1.5, True), ("orthogonal", 3.0, False), ("orthogonal", -2.0, True),
                ("cap", 0.5, False), ("cap", 0.0, True)]  # cap: a quantile of the projections seen (below)


@pytest.mark.parametrize("family,kind", [("llama", "hook_resid_post"), ("gpt2", "hook_mlp_out")])
@pytest.mark.parametrize("method,coeff,normalize", METHOD_CASES)
def test_each_steering_method_equals_neuronpedias_formula_in_a_hook(tiny, family, kind, method, coeff, normalize):
    lm = tiny(family)
    sae = make_sae("topk", "none", f"blocks.1.{kind}", seed=5, dec=3.0)
    ids = prompt_ids(12, seed=8)
    f = most_active(sae, lm, ids, 1)[0]
    if method == "cap":  # a cap some positions' projections exceed
        u = (sae.W_dec[f] / sae.W_dec[f].norm()).detach()
        coeff = float((lm.activations(ids[None], sae.cfg.hook_name)[0] @ u).quantile(coeff))
    got = iv.spliced_logits(lm, sae, ids, [iv.Edit(f, method, coeff, normalize=normalize)])
    want = steered_reference_logits(lm, family, sae, ids, [(f, method, coeff, normalize)])
    assert rel(got, want) <= 1e-4
    assert rel(got, plain_logits(lm, ids)) > 1e-3  # the method did something measurable


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_features_each_with_its_own_method_and_strength(tiny, family):
    lm = tiny(family)
    sae = make_sae("standard", "none", "blocks.1.hook_resid_post", seed=9, dec=3.0)
    ids = prompt_ids(12, seed=1)
    f, g, h = most_active(sae, lm, ids, 3)
    steps = [(f, "add", 2.0, False), (g, "orthogonal", 4.0, False), (h, "cap", 0.0, False), (f, "add", 0.5, True)]
    got = iv.spliced_logits(lm, sae, ids, [iv.Edit(a, m, c, normalize=n) for a, m, c, n in steps])
    assert rel(got, steered_reference_logits(lm, family, sae, ids, steps)) <= 1e-4
    # positions: steering from position 4 on leaves the first four predictions bit-for-bit
    at = tuple(range(4, len(ids)))
    got = iv.spliced_logits(lm, sae, ids, [iv.Edit(g, "orthogonal", 4.0, at), iv.Edit(h, "cap", 0.0, at)])
    assert torch.equal(got[:4], plain_logits(lm, ids)[:4]) and rel(got, plain_logits(lm, ids)) > 1e-3


def test_steering_methods_on_the_embedded_default(default_lm, demo_sae):
    tok = default_lm.tokenizer
    ids = torch.tensor([tok.bos_token_id] + tok("The weather today is", add_special_tokens=False)["input_ids"])
    steps = [(100, "add", 6.0, False), (200, "orthogonal", 3.0, False), (300, "cap", 0.5, False),
             (400, "add", 8.0, True)]
    got = iv.spliced_logits(default_lm, demo_sae, ids, [iv.Edit(a, m, c, normalize=n) for a, m, c, n in steps])
    want = steered_reference_logits(default_lm, None, demo_sae, ids, steps)
    assert rel(got, want) <= 1e-4 and rel(got, plain_logits(default_lm, ids)) > 1e-3


def test_a_neutral_strength_gives_plain_generate_for_every_method(default_lm, demo_sae):
    """add 0, orthogonal 1 ((I-P)h + Ph = h) and a cap above every projection change nothing (for orthogonal and
    cap, Neuronpedia's own definitions make coefficient 0 an edit: it removes / caps at 0 the component on v)."""
    tok = default_lm.tokenizer
    ids = [tok.bos_token_id] + tok("Once upon a time, in a small village,", add_special_tokens=False)["input_ids"]
    n = 10
    ref = default_lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
    full = torch.tensor([ids + ref])
    x = default_lm.activations(full, demo_sae.cfg.hook_name)[0]
    u = (demo_sae.W_dec[300] / demo_sae.W_dec[300].norm()).detach()
    cap = LIMITS.max_abs_value
    assert float((x @ u).max()) < cap  # so the cap is never reached
    for mode in iv.STEER_MODES:
        value = cap if mode == "cap" else iv.NEUTRAL_VALUE[mode]
        out = iv.generate(default_lm, demo_sae, ids, [iv.Edit(300, mode, value)], max_new_tokens=n)
        assert out.steered.ids == ref and out.default.ids == ref, mode
    # coefficient 0 of add (with or without normalize) is plain generate too
    out = iv.generate(default_lm, demo_sae, ids, [iv.Edit(300, "add", 0.0, normalize=True)], max_new_tokens=n)
    assert out.steered.ids == ref
    lm = iv.spliced_logits(default_lm, demo_sae, ids, [iv.Edit(300, "orthogonal", 1.0), iv.Edit(5, "cap", cap)])
    assert torch.equal(lm, plain_logits(default_lm, torch.tensor(ids)))


def test_bad_steering_method_input(tiny):
    lm = tiny("llama")
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post")
    with torch.no_grad():
        sae.W_dec[7] = 0
    ids = prompt_ids(6).tolist()
    with pytest.raises(ValueError, match=r"feature 7 has a zero decoder row"):
        iv.spliced_logits(lm, sae, ids, [iv.Edit(7, "orthogonal", 2.0)])
    with pytest.raises(ValueError, match=r"normalize applies to the steering modes \(add, orthogonal, cap\)"):
        iv.spliced_logits(lm, sae, ids, [iv.Edit(1, "clamp", 2.0, normalize=True)])
    with pytest.raises(ValueError, match=r"not finite"):
        iv.spliced_logits(lm, sae, ids, [iv.Edit(1, "cap", float("nan"))])


# ------------------------------------------------------------------ log-probabilities and KL per step
@pytest.mark.parametrize("sampling", [iv.Sampling(), iv.Sampling(temperature=1.0, top_p=0.9, seed=5)])
def test_top_logprobs_and_kl_equal_the_models_own_log_softmax(default_lm, demo_sae, sampling):
    tok = default_lm.tokenizer
    ids = [tok.bos_token_id] + tok("My favourite food is", add_special_tokens=False)["input_ids"]
    steps = [(100, "add", 12.0, False), (300, "orthogonal", 4.0, False)]
    edits = [iv.Edit(a, m, c, normalize=n) for a, m, c, n in steps]
    n, k, T = 8, LIMITS.max_logprobs, len(ids)
    out = iv.generate(default_lm, demo_sae, ids, edits, max_new_tokens=n, sampling=sampling, n_logprobs=k, kl=True,
                      stop_at_eos=False)
    assert out.default.ids != out.steered.ids
    d_full = torch.tensor(ids + out.default.ids[:-1])
    s_full = torch.tensor(ids + out.steered.ids[:-1])
    lp_default = torch.log_softmax(plain_logits(default_lm, d_full)[T - 1:], -1)  # (n, vocab)
    lp_steered = torch.log_softmax(steered_reference_logits(default_lm, None, demo_sae, s_full, steps)[T - 1:], -1)
    for cont, ref in ((out.default, lp_default), (out.steered, lp_steered)):
        chosen = ref.gather(-1, torch.tensor(cont.ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(cont.logprobs), chosen, rtol=1e-4, atol=1e-4)
        assert len(cont.top_logprobs) == n and all(len(t) == k for t in cont.top_logprobs)
        for t, top in enumerate(cont.top_logprobs):
            want = ref[t].topk(k)
            assert [i for i, _ in top] == want.indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), want.values, rtol=1e-4, atol=1e-4)
    # KL(default || steered) of the next-token distribution, both given the steered prefix
    lp_plain_on_steered = torch.log_softmax(plain_logits(default_lm, s_full)[T - 1:], -1)
    want_kl = (lp_plain_on_steered.exp() * (lp_plain_on_steered - lp_steered)).sum(-1)
    assert out.kl is not None and len(out.kl) == n
    torch.testing.assert_close(torch.tensor(out.kl), want_kl, rtol=2e-3, atol=2e-4)
    assert max(out.kl) > 0.01
    # the shadow row changes nothing else: same tokens and log-probs without it
    bare = iv.generate(default_lm, demo_sae, ids, edits, max_new_tokens=n, sampling=sampling, stop_at_eos=False)
    assert bare.steered.ids == out.steered.ids and bare.default.ids == out.default.ids and bare.kl is None
    with pytest.raises(ValueError, match=rf"n_logprobs 11 is out of range; allowed: 0\.\.{LIMITS.max_logprobs}"):
        iv.generate(default_lm, demo_sae, ids, edits, max_new_tokens=2, n_logprobs=11)


def test_suggested_strengths_follow_the_stated_derivation(default_lm, demo_sae):
    from saescope.precompute.interventions.strength import measure_scale, suggest

    tok = default_lm.tokenizer
    ids = [tok.bos_token_id] + tok("The weather today is sunny and warm", add_special_tokens=False)["input_ids"]
    sc = measure_scale(default_lm, demo_sae, ids, [100, 300])
    h = default_lm.activations(torch.tensor([ids]), demo_sae.cfg.hook_name)[0, 1:]  # first position left out
    assert sc.resid_norm == pytest.approx(float(h.norm(dim=-1).median()), rel=1e-5)
    for fs, f in zip(sc.features, (100, 300)):
        v = demo_sae.W_dec[f].detach()
        assert fs.decoder_norm == pytest.approx(float(v.norm()), rel=1e-5)
        assert fs.projection == pytest.approx(float((h @ (v / v.norm())).median()), rel=1e-4, abs=1e-5)
    fs = sc.features[0]
    add = suggest("add", False, 5.0, fs, sc.resid_norm)
    assert add.strong == pytest.approx(0.5 * sc.resid_norm / fs.decoder_norm, rel=1e-6)
    assert add.extreme == pytest.approx(2 * sc.resid_norm / fs.decoder_norm, rel=1e-6)
    assert add.gentle <= add.strong < add.extreme and add.lo <= add.gentle and add.extreme <= add.hi
    unit = suggest("add", True, 5.0, fs, sc.resid_norm)
    assert unit.strong == pytest.approx(0.5 * sc.resid_norm, rel=1e-6)
    orth = suggest("orthogonal", False, 5.0, fs, sc.resid_norm)
    assert 1.0 < orth.gentle < orth.strong < orth.extreme
    cap = suggest("cap", False, 5.0, fs, sc.resid_norm)
    assert cap.gentle >= cap.strong == 0.0 > cap.extreme
    assert cap.extreme == pytest.approx(-5.0 * fs.decoder_norm, rel=1e-6)


# ------------------------------------------------------------------ steering a chat
def test_chat_template_equals_the_tokenizers_own_and_replies_are_generated(default_lm, demo_sae):
    from saescope.precompute.interventions.chat import chat_prompt, reply_text, steer_chat

    tok = default_lm.tokenizer
    convo = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "The capital of France is Paris."},
             {"role": "user", "content": "And of Italy?"}]
    text, ids = chat_prompt(default_lm, convo)
    own = tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=True)
    own = own["input_ids"] if hasattr(own, "keys") else own
    assert ids == list(own)
    assert text == tok.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    n = 12
    ref = default_lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)[0, len(ids):].tolist()
    _, g = steer_chat(default_lm, demo_sae, convo, [iv.Edit(100, "orthogonal", 1.0)], max_new_tokens=n)
    assert g.default.ids == ref[:len(g.default.ids)] and g.steered.ids == g.default.ids
    _, g = steer_chat(default_lm, demo_sae, convo, [iv.Edit(100, "add", 30.0)], max_new_tokens=n,
                      sampling=iv.Sampling(0.8, 1.0, 3))
    _, again = steer_chat(default_lm, demo_sae, convo, [iv.Edit(100, "add", 30.0)], max_new_tokens=n,
                          sampling=iv.Sampling(0.8, 1.0, 3))
    assert g.steered.ids == again.steered.ids and g.default.ids == again.default.ids  # same seed, same replies
    assert "<|im_end|>" not in reply_text(default_lm, g.default.ids)
    for bad, msg in [([], r"non-empty"), ([{"role": "user", "content": "x"}] * (LIMITS.max_chat_turns + 1),
                                          rf"{LIMITS.max_chat_turns + 1} messages; the limit is {LIMITS.max_chat_turns}"),
                     (convo[:2], r"the last message is the assistant's"),
                     ([{"role": "user", "content": "x" * (LIMITS.max_message_chars + 1)}], r"characters; the limit is"),
                     ([{"role": "robot", "content": "x"}], r"role 'robot'; valid")]:
        with pytest.raises(ValueError, match=msg):
            chat_prompt(default_lm, bad)


# ------------------------------------------------------------------ batched generation across requests
def _same(a: iv.Generation, b: iv.Generation) -> None:
    for x, y in ((a.steered, b.steered), (a.default, b.default)):
        if x is None:
            assert y is None
            continue
        assert x.ids == y.ids
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), rtol=1e-4, atol=1e-4)
        assert [[i for i, _ in t] for t in x.top_logprobs] == [[i for i, _ in t] for t in y.top_logprobs]
        torch.testing.assert_close(torch.tensor(x.feature_acts), torch.tensor(y.feature_acts), rtol=1e-3, atol=1e-3)
    assert a.stopped == b.stopped and a.watch == b.watch
    if a.kl is not None:
        torch.testing.assert_close(torch.tensor(a.kl), torch.tensor(b.kl), rtol=1e-3, atol=1e-4)


def test_batched_requests_equal_each_request_run_alone(default_lm, demo_sae):
    tok = default_lm.tokenizer
    enc = lambda s: [tok.bos_token_id] + tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    G = iv.GenRequest
    reqs = [G(enc("Once upon a time"), [iv.Edit(100, "add", 10.0)], 8),
            G(enc("The weather in the mountains is cold and the wind"), [iv.Edit(300, "orthogonal", 4.0)], 6,
              iv.Sampling(0.9, 0.95, 11), n_logprobs=3, kl=True),
            G(enc("I like"), [iv.Edit(200, "cap", 0.0), iv.Edit(100, "add", 6.0, (3, 4, 9))], 10,
              iv.Sampling(1.0, 1.0, 2), with_default=False),
            G(enc("Python is a programming language that"), [iv.Edit(400, "clamp", 5.0, (2,))], 5, kl=True,
              n_logprobs=2, stop_at_eos=False)]
    together = iv.generate_many(default_lm, demo_sae, reqs)
    for req, got in zip(reqs, together):
        alone = iv.generate(default_lm, demo_sae, req.ids, req.edits, req.max_new_tokens, req.sampling,
                            with_default=req.with_default, stop_at_eos=req.stop_at_eos, n_logprobs=req.n_logprobs,
                            kl=req.kl)
        _same(got, alone)
    with pytest.raises(ValueError, match=r"feature 99999 is out of range"):
        iv.generate_many(default_lm, demo_sae, [reqs[0], G(enc("x"), [iv.Edit(99999, "add", 1.0)])])


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_batched_requests_on_tiny_families(tiny, family):
    lm = tiny(family)
    sae = make_sae("topk", "none", "blocks.1.hook_resid_post", dec=3.0)
    G = iv.GenRequest
    reqs = [G(prompt_ids(5, seed=1).tolist(), [iv.Edit(3, "add", 20.0)], 12, stop_at_eos=False),
            G(prompt_ids(11, seed=2).tolist(), [iv.Edit(4, "orthogonal", 3.0, (12, 13))], 9, iv.Sampling(1.0, 0.9, 5),
              stop_at_eos=False, kl=True),
            G(prompt_ids(8, seed=3).tolist(), [iv.Edit(5, "cap", 0.0)], 14, stop_at_eos=False, n_logprobs=4)]
    for req, got in zip(reqs, iv.generate_many(lm, sae, reqs)):
        alone = iv.generate(lm, sae, req.ids, req.edits, req.max_new_tokens, req.sampling,
                            stop_at_eos=req.stop_at_eos, n_logprobs=req.n_logprobs, kl=req.kl)
        _same(got, alone)
