"""Every SAE format and architecture loads, and encode equals an independent numpy reference to <= 1e-5."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from saescope.precompute.saes import REGISTRY, SAEFormatError, load_sae
from tests.conftest import TINY_CLI

D_IN, D_SAE = 16, 40


def _rand(seed=0):
    r = np.random.default_rng(seed)
    return {
        "W_enc": r.normal(size=(D_IN, D_SAE)).astype(np.float32) / 4,
        "W_dec": r.normal(size=(D_SAE, D_IN)).astype(np.float32) / 4,
        "b_enc": r.normal(size=D_SAE).astype(np.float32) / 4,
        "b_dec": r.normal(size=D_IN).astype(np.float32) / 4,
        "threshold": np.abs(r.normal(size=D_SAE)).astype(np.float32) / 4,
        "b_gate": r.normal(size=D_SAE).astype(np.float32) / 4,
        "b_mag": r.normal(size=D_SAE).astype(np.float32) / 4,
        "r_mag": r.normal(size=D_SAE).astype(np.float32) / 4,
    }


def _x(seed=1, n=32):
    return np.random.default_rng(seed).normal(size=(n, D_IN)).astype(np.float32) * 3


# ---- independent references (numpy, written from the papers' formulas) ----
def ref_norm(x, mode):
    x = x.astype(np.float64)
    if mode == "constant_norm_rescale":
        return x * np.sqrt(D_IN) / np.linalg.norm(x, axis=-1, keepdims=True)
    if mode == "layer_norm":
        x = x - x.mean(-1, keepdims=True)
        return x / (x.std(-1, ddof=1, keepdims=True) + 1e-5)
    return x


def ref_encode(arch, w, x, k=None, b_dec_in=True, norm="none"):
    x = ref_norm(x, norm)
    w = {n: v.astype(np.float64) for n, v in w.items()}
    s = x - w["b_dec"] if b_dec_in else x
    if arch == "gated":
        gate = (s @ w["W_enc"] + w["b_gate"]) > 0
        mag = np.maximum(s @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
        return gate * mag
    pre = s @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.where(pre > w["threshold"], np.maximum(pre, 0), 0)
    if arch == "topk":
        out = np.zeros_like(pre)
        idx = np.argsort(-pre, axis=-1)[:, :k]
        rows = np.arange(pre.shape[0])[:, None]
        out[rows, idx] = np.maximum(pre[rows, idx], 0)
        return out
    raise ValueError(arch)


def _encode(sae, x):
    with torch.no_grad():
        return sae.encode(torch.from_numpy(x)).numpy()


KEYS = {"standard": ["W_enc", "W_dec", "b_enc", "b_dec"], "jumprelu": ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"],
        "topk": ["W_enc", "W_dec", "b_enc", "b_dec"], "gated": ["W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"]}


def write_saelens(folder, arch, w, layout="v6", **over):
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "v6":
        cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "metadata": {"model_name": "m", "hook_name": "blocks.2.hook_resid_post",
                                                             "sae_lens_version": "6.5.0", "prepend_bos": False}}
        if arch == "topk":
            cfg["k"] = 5
    else:  # the flat pre-6 layout
        cfg = {"architecture": "standard" if arch == "topk" else arch, "d_in": D_IN, "d_sae": D_SAE,
               "hook_point": "blocks.2.hook_resid_post", "hook_point_layer": 2, "model_name": "m",
               "activation_fn_str": "topk" if arch == "topk" else "relu", "sae_lens_training_version": "3.2.0",
               "normalize_activations": False}
        if arch == "topk":
            cfg["activation_fn_kwargs"] = {"k": 5}
    cfg.update(over)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: w[k] for k in KEYS[arch]}, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize("layout", ["v6", "flat"])
@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_saelens_encode_matches_reference(tmp_path, arch, layout):
    w = _rand()
    sae = load_sae(write_saelens(tmp_path / "s", arch, w, layout))
    assert sae.cfg.hook_name == "blocks.2.hook_resid_post" and sae.cfg.architecture == arch
    x = _x()
    np.testing.assert_allclose(_encode(sae, x), ref_encode(arch, w, x, k=5), atol=1e-5, rtol=1e-5)
    assert (ref_encode(arch, w, x, k=5) > 0).any() and (ref_encode(arch, w, x, k=5) == 0).any()


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_normalize_activations(tmp_path, norm):
    w = _rand(2)
    sae = load_sae(write_saelens(tmp_path / "s", "standard", w, normalize_activations=norm))
    x = _x(3)
    np.testing.assert_allclose(_encode(sae, x), ref_encode("standard", w, x, norm=norm), atol=1e-5, rtol=1e-5)


def test_apply_b_dec_to_input_false(tmp_path):
    w = _rand(4)
    sae = load_sae(write_saelens(tmp_path / "s", "jumprelu", w, apply_b_dec_to_input=False))
    x = _x(5)
    np.testing.assert_allclose(_encode(sae, x), ref_encode("jumprelu", w, x, b_dec_in=False), atol=1e-5, rtol=1e-5)


def test_expected_average_only_in_is_folded(tmp_path):
    """The SAE was trained on s*x; loading folds s so that raw x gives the same features."""
    w, s = _rand(6), 0.37
    sae = load_sae(write_saelens(tmp_path / "s", "standard", w, normalize_activations="expected_average_only_in",
                                 norm_scaling_factor=s))
    assert sae.cfg.normalize_activations == "none"
    x = _x(7)
    np.testing.assert_allclose(_encode(sae, x), ref_encode("standard", w, x * s), atol=1e-5, rtol=1e-5)
    with pytest.raises(SAEFormatError, match="norm_scaling_factor"):
        load_sae(write_saelens(tmp_path / "t", "standard", w, normalize_activations="expected_average_only_in"))


def test_gemmascope_npz(tmp_path):
    w = _rand(8)
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: w[k] for k in KEYS["jumprelu"]})
    sae = load_sae(folder)
    assert sae.cfg.hook_name == "blocks.12.hook_resid_post" and not sae.cfg.apply_b_dec_to_input
    x = _x(9)
    np.testing.assert_allclose(_encode(sae, x), ref_encode("jumprelu", w, x, b_dec_in=False), atol=1e-5, rtol=1e-5)


def test_sparsify_folder(tmp_path):
    w = _rand(10)
    folder = tmp_path / "layers.3"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE,
                                                 "k": 7, "multi_topk": False, "d_in": D_IN}))
    save_file({"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
               "b_dec": w["b_dec"]}, str(folder / "sae.safetensors"))
    sae = load_sae(folder)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.k == 7
    x = _x(11)
    # sparsify: top-k of ReLU(encoder(x - b_dec)); equal to the TopK reference
    np.testing.assert_allclose(_encode(sae, x), ref_encode("topk", w, x, k=7), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["ReLU", "TopK"])
def test_openai_state_dict(tmp_path, activation):
    w = _rand(12)
    sd = {"pre_bias": torch.from_numpy(w["b_dec"]), "latent_bias": torch.from_numpy(w["b_enc"]),
          "encoder.weight": torch.from_numpy(np.ascontiguousarray(w["W_enc"].T)),
          "decoder.weight": torch.from_numpy(np.ascontiguousarray(w["W_dec"].T)),
          "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long), "activation": activation}
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": 6, "postact_fn": "ReLU"}
    torch.save(sd, tmp_path / "8.pt")
    sae = load_sae(tmp_path / "8.pt", hook="blocks.8.hook_resid_post")
    x = _x(13)
    want = ref_encode("topk", w, x, k=6, norm="layer_norm") if activation == "TopK" else ref_encode("standard", w, x)
    np.testing.assert_allclose(_encode(sae, x), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(SAEFormatError, match="--hook"):
        load_sae(tmp_path / "8.pt")


# ---- bad files: one clear message naming the file, the field, what was found and what was expected ----
def test_missing_tensor(tmp_path):
    w = _rand()
    folder = write_saelens(tmp_path / "s", "jumprelu", w)
    save_file({k: w[k] for k in KEYS["standard"]}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError) as e:
        load_sae(folder)
    msg = str(e.value)
    assert "sae_weights.safetensors" in msg and "'threshold'" in msg and "no such tensor" in msg and "(40,)" in msg


def test_wrong_shape(tmp_path):
    w = _rand()
    w["b_dec"] = np.zeros(D_IN + 1, np.float32)
    with pytest.raises(SAEFormatError, match=r"'b_dec': found shape \(17,\); expected shape \(16,\)"):
        load_sae(write_saelens(tmp_path / "s", "standard", w))


def test_unknown_architecture_lists_valid(tmp_path):
    with pytest.raises(SAEFormatError, match="cfg.json: field 'architecture': found 'matryoshka'; expected one of gated, jumprelu, standard, topk"):
        load_sae(write_saelens(tmp_path / "s", "standard", _rand(), architecture="matryoshka"))


def test_folder_with_no_sae_names_the_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SAEFormatError, match="sae_weights.safetensors"):
        load_sae(tmp_path)


def test_d_in_mismatch_with_the_hook_is_explained(tmp_path, tiny_lm_dir):
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    folder = write_saelens(tmp_path / "s", "standard", _rand())  # d_in 16, the tiny model has width 64
    with pytest.raises(ValueError, match="d_in=16.*has width 64"):
        run_precompute(PrecomputeSpec(out=tmp_path / "x.duckdb", model=str(tiny_lm_dir), saes=[SAESpec(str(folder))], tokens=256,
                                      progress=False))


def test_hub_reference_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="no network here.*local folders"):
        load_sae("some-org/some-saes/layer_3")


@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale", "layer_norm"])
def test_denormalize_inverts_normalize(norm):
    """SAE.denormalize(normalize(x), norm_stats(x)) == x, and (x - shift) / scale == normalize(x)."""
    from saescope.precompute.saes import SAEConfig
    from saescope.precompute.saes.topk import TopKSAE

    sae = TopKSAE(SAEConfig(architecture="topk", d_in=16, d_sae=8, k=2, normalize_activations=norm))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 1
    stats = sae.norm_stats(x)
    assert stats[0].shape == stats[1].shape == (3, 5, 1)
    torch.testing.assert_close(sae.denormalize(sae.normalize(x), stats), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((x - stats[1]) / stats[0], sae.normalize(x), rtol=1e-12, atol=1e-12)


def test_check_d_in_names_both_widths():
    from saescope.precompute.saes import SAEConfig, check_d_in
    from saescope.precompute.saes.topk import TopKSAE

    sae = TopKSAE(SAEConfig(architecture="topk", d_in=16, d_sae=8, k=2))
    check_d_in(sae, 16, "blocks.0.hook_resid_post", "m")
    with pytest.raises(ValueError, match=r"SAE 's1' reads vectors of width d_in=16, but blocks.0.hook_resid_post "
                                         r"of model 'm' has width 32"):
        check_d_in(sae, 32, "blocks.0.hook_resid_post", "m", "s1")


def test_an_sae_folder_without_cfg_json_says_what_is_missing(tmp_path, capsys, tiny_sae_dir, tiny_lm_dir):
    """Before: load_sae raised a bare "[Errno 2] No such file or directory: '.../cfg.json'"."""
    from saescope.app.cli import main
    from saescope.precompute.saes import load_sae
    from saescope.precompute.saes.base import SAEFormatError

    folder = tmp_path / "sae_no_cfg"
    folder.mkdir()
    shutil.copy(tiny_sae_dir / "sae_weights.safetensors", folder)
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(SAEFormatError) as e:
        load_sae(folder)
    msg = str(e.value)
    assert "Errno" not in msg
    assert "cfg.json" in msg and "sae_weights.safetensors" in msg and "notes.txt" in msg
    assert "expected" in msg and "d_sae" in msg
    capsys.readouterr()
    code = main(["precompute", "--model", str(tiny_lm_dir), "--sae", str(folder), "--dataset", "default",
                 "--tokens", "128", "--out", str(tmp_path / "x.duckdb"), *TINY_CLI])
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    said = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert said and "cfg.json" in said[-1] and "notes.txt" in said[-1] and "Errno" not in err, err[-2000:]
    assert not (tmp_path / "x.duckdb").exists()

