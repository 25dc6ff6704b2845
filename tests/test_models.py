"""Hook names map onto GPT-2, GPT-NeoX, Llama and Gemma-2 module trees; checked against hidden_states."""

import json

import pytest
import torch

from saescope.precompute.models import HookedLM, load_model, parse_hook

FAMILIES = ["gpt2", "neox", "llama", "gemma2"]


def _load(path) -> HookedLM:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # reloaded from disk
    return HookedLM(model, None, str(path), "cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_hooks_equal_hidden_states(family, tiny_family_dir):
    lm = _load(tiny_family_dir(family))
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    n = lm.n_layers
    assert len(hs) == n + 1
    for L in range(n):
        assert torch.equal(lm.activations(ids, f"blocks.{L}.hook_resid_pre"), hs[L].float()), f"resid_pre {L}"
        if L < n - 1:  # the last hidden_states entry is after the final norm
            assert torch.equal(lm.activations(ids, f"blocks.{L}.hook_resid_post"), hs[L + 1].float()), f"resid_post {L}"
    last = lm.activations(ids, f"blocks.{n - 1}.hook_resid_post")
    assert not torch.allclose(last, hs[n].float()), "the last resid_post must come from the hook, not the normed output"
    norm = lm.model.get_decoder().norm if hasattr(lm.model, "get_decoder") and hasattr(lm.model.get_decoder(), "norm") else None
    if norm is not None:
        assert torch.allclose(norm(last), hs[n], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_plus_mlp_is_the_residual_update(family, tiny_family_dir):
    """resid_post - resid_pre == attn_out + mlp_out in every family (Gemma-2: after its post-norms)."""
    lm = _load(tiny_family_dir(family))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    for L in range(lm.n_layers):
        pre = lm.activations(ids, f"blocks.{L}.hook_resid_pre")
        post = lm.activations(ids, f"blocks.{L}.hook_resid_post")
        attn = lm.activations(ids, f"blocks.{L}.hook_attn_out")
        mlp = lm.activations(ids, f"blocks.{L}.hook_mlp_out")
        torch.testing.assert_close(post - pre, attn + mlp, atol=1e-5, rtol=1e-5)


def test_forward_stops_after_the_hooked_layer(tiny_family_dir):
    lm = _load(tiny_family_dir("llama"))
    calls: list[int] = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        lm.activations(torch.tensor([[1, 2, 3]]), "blocks.0.hook_resid_post")
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]


def test_bad_hook_names_list_the_valid_forms(tiny_family_dir):
    with pytest.raises(ValueError, match="valid: blocks.<layer>.<kind>"):
        parse_hook("blocks.1.hook_z")
    with pytest.raises(ValueError, match="layers 0..2"):
        parse_hook("blocks.7.hook_resid_post", n_layers=3)


def test_missing_hub_model_says_to_use_a_local_folder():
    from saescope.precompute.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="local folder"):
        load_model("no-such-owner/no-such-model-xyz")


def test_embedded_default_reloads_through_from_pretrained(default_model_dir):
    from transformers import AutoConfig, PreTrainedTokenizerFast

    cfg = AutoConfig.from_pretrained(default_model_dir)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.hidden_size == 576
    assert not hasattr(cfg, "quantization_config")
    raw = json.loads((default_model_dir / "config.json").read_text())
    # transformers 4.5x reads the top-level rope_theta; 5.x writes only rope_parameters
    assert raw["rope_theta"] == raw["rope_parameters"]["rope_theta"] == 100000.0
    # the tokenizer files are the plain fast-tokenizer kind every transformers 4.5x / 5.x reads
    tok = PreTrainedTokenizerFast.from_pretrained(default_model_dir)
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    lm = load_model(str(default_model_dir), "cpu", "float32")
    n_params = sum(p.numel() for p in lm.model.parameters())
    assert 134_000_000 < n_params < 135_000_000


@pytest.mark.parametrize("family", FAMILIES)
def test_final_norm_gain_per_family(family, tiny_family_dir):
    """The gain folded into logit effects: Gemma's RMSNorm scales by (1 + weight), the others by weight."""
    lm = _load(tiny_family_dir(family))
    gain = lm.final_norm_gain()
    norm = {"gpt2": lambda m: m.transformer.ln_f, "neox": lambda m: m.gpt_neox.final_layer_norm,
            "llama": lambda m: m.model.norm, "gemma2": lambda m: m.model.norm}[family](lm.model)
    x = torch.randn(3, lm.d_model)
    if family == "gemma2":
        torch.testing.assert_close(gain, 1 + norm.weight.detach())
    else:
        torch.testing.assert_close(gain, norm.weight.detach())
    # independent check: for a zero-mean, unit-rms input the norm's output is exactly the gain times the input
    x = x - x.mean(-1, keepdim=True)
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    with torch.no_grad():
        out = norm(x)
    bias = getattr(norm, "bias", None)
    want = x * gain + (bias.detach() if bias is not None else 0)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------ the public hook API
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out"])
def test_hooks_replace_an_activation_like_a_hand_written_hook(family, kind, tiny_family_dir):
    """lm.hooks({name: fn}) equals a forward (pre-)hook written here on the module the name means."""
    import threading

    from saescope.precompute.models import StopForward

    lm = _load(tiny_family_dir(family))
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    name = f"blocks.1.{kind}"
    fn = lambda x: x * 0.5 + 0.25  # noqa: E731
    layer = lm.layers[1]
    if kind == "hook_resid_pre":
        handle = layer.register_forward_pre_hook(
            lambda m, a, k: ((fn(a[0]),) + a[1:], k) if a else (a, {**k, "hidden_states": fn(k["hidden_states"])}),
            with_kwargs=True)
    else:
        gemma = family == "gemma2"
        mod = layer if kind == "hook_resid_post" else (
            (layer.post_feedforward_layernorm if gemma else getattr(layer, "mlp")) if kind == "hook_mlp_out" else
            (layer.post_attention_layernorm if gemma else next(getattr(layer, n) for n in ("self_attn", "attn", "attention")
                                                             if hasattr(layer, n))))
        assert lm.hook_point(name).module is mod and not lm.hook_point(name).pre
        handle = mod.register_forward_hook(lambda m, a, o: (fn(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else fn(o))
    with torch.no_grad():
        try:
            want = lm.model(ids).logits
        finally:
            handle.remove()
        plain = lm.model(ids).logits
        with lm.hooks({name: fn}):
            got = lm.model(ids).logits
            other = []  # another thread's forward pass is not touched
            t = threading.Thread(target=lambda: other.append(lm.model(ids).logits))
            t.start()
            t.join()
        after = lm.model(ids).logits
    assert torch.equal(got, want) and not torch.equal(got, plain)
    assert torch.equal(other[0], plain) and torch.equal(after, plain), "hooks end with the block and stay in their thread"
    seen: list[torch.Tensor] = []
    assert lm.run_with_hooks(ids, [(name, lambda x: seen.append(x.clone()))], stop_at=name) is None
    assert torch.equal(seen[0].float(), lm.activations(ids, name))

    def stop(_x):
        raise StopForward
    assert lm.run_with_hooks(ids, [(name, stop)]) is None


def test_activations_multi_equals_one_hook_at_a_time(tiny_lm_dir, small_corpus):
    """One pass with several hooks gives bitwise the activations of a pass per hook, and of the HF hidden states."""
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    hooks = ["blocks.2.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"]
    got = lm.activations_multi(ids, hooks)
    assert list(got) == hooks
    for h in hooks:
        assert torch.equal(got[h], lm.activations(ids, h)), h
    with torch.no_grad():
        hs = lm.model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], hs[2], rtol=0, atol=0)
    torch.testing.assert_close(got["blocks.2.hook_resid_pre"], hs[2], rtol=0, atol=0)


def test_activations_multi_stops_after_the_deepest_hook(tiny_lm_dir):
    from saescope.precompute.models import load_model

    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ran: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda _m, _a, i=i: ran.append(i)) for i, layer in enumerate(lm.layers)]
    try:
        lm.activations_multi(torch.tensor([[1, 5, 9]]), ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1], "layer 2 must not run when the deepest hook is in layer 1"

