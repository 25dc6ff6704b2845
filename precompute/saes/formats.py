"""Readers for SAELens folders, Gemma Scope params.npz, EleutherAI sparsify folders and OpenAI state dicts.

Every reader ends in `_build`, which checks each tensor's presence and shape against the architecture and
names the file and field when something is off.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .registry import sae_class
from .base import SAE, SAEConfig, SAEFormatError
from ..errors import NotFound

log = logging.getLogger(__name__)

SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
GEMMASCOPE_WEIGHTS = "params.npz"


# ---------------------------------------------------------------- shared
def _build(cfg: SAEConfig, state: dict[str, torch.Tensor], file: str) -> SAE:
    cls = sae_class(cfg.architecture, file)
    for name, shape in cls.param_shapes(cfg.d_in, cfg.d_sae).items():
        if name not in state:
            raise SAEFormatError(file, name, f"no such tensor (have: {', '.join(sorted(state)) or 'none'})",
                                 f"a tensor of shape {shape} for architecture {cfg.architecture!r}")
        if tuple(state[name].shape) != shape:
            raise SAEFormatError(file, name, f"shape {tuple(state[name].shape)}",
                                 f"shape {shape} (d_in={cfg.d_in}, d_sae={cfg.d_sae})")
    sae = cls(cfg)
    with torch.no_grad():
        for name in cls.param_shapes(cfg.d_in, cfg.d_sae):
            getattr(sae, name).copy_(state[name].to(torch.float32))
    return sae.eval()


def _int_field(cfg: dict[str, Any], key: str, file: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SAEFormatError(file, key, repr(v), "a positive integer")
    return v


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise SAEFormatError(str(path), "(file)", f"unreadable ({err})", "a safetensors file") from err


# ---------------------------------------------------------------- SAELens
def _saelens_cfg(raw: dict[str, Any], file: str, hook: str | None) -> tuple[SAEConfig, float | None]:
    meta = raw.get("metadata") or {}
    flat = {**raw, **meta}  # v6 keeps model/hook facts under "metadata"; older files are flat
    arch = raw.get("architecture", "standard")
    act_fn = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    arch = {"jump_relu": "jumprelu", "relu": "standard"}.get(arch, arch)
    sae_class(arch, file)  # unknown architecture: fail here, naming cfg.json
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if arch == "transcoder" and act_fn == "topk":
        arch = "topk_transcoder"
    if arch.startswith("topk"):
        if not isinstance(k, (int, float)) or int(k) <= 0:
            raise SAEFormatError(file, "k", repr(k), "a positive integer for a topk SAE")
        k = int(k)
    norm = raw.get("normalize_activations", "none")
    if isinstance(norm, bool):  # legacy: True meant the April-update expected-average scaling
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    scale = None
    if norm == "expected_average_only_in":
        scale = flat.get("norm_scaling_factor", flat.get("scaling_factor"))
        if not isinstance(scale, (int, float)):
            raise SAEFormatError(file, "norm_scaling_factor", repr(scale),
                                 "a number, because normalize_activations is 'expected_average_only_in' "
                                 "(the factor is folded into the weights at load)")
        norm = "none"
    valid_norms = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
    if norm not in valid_norms:
        raise SAEFormatError(file, "normalize_activations", repr(norm), f"one of {', '.join(valid_norms)}")
    hook_name = hook or flat.get("hook_name") or flat.get("hook_point")
    hook_out = None
    if sae_class(arch, file).is_transcoder:
        d_out = raw.get("d_out", raw.get("d_in"))
        if d_out != raw.get("d_in"):
            raise SAEFormatError(file, "d_out", repr(d_out), f"d_in ({raw.get('d_in')}): an MLP reads and writes the residual width")
        hook_out = flat.get("hook_name_out") or _mlp_out_of(hook_name)
        if norm != "none":
            raise SAEFormatError(file, "normalize_activations", repr(norm), "'none' for a transcoder")
    cfg = SAEConfig(
        architecture=arch,
        d_in=_int_field(raw, "d_in", file),
        d_sae=_int_field(raw, "d_sae", file),
        hook_name=hook_name,
        hook_name_out=hook_out,
        model_name=flat.get("model_name"),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)) and hook_out is None,
        normalize_activations=norm,
        k=k if arch.startswith("topk") else None,
        prepend_bos=bool(flat.get("prepend_bos", True)),
        context_size=flat.get("context_size"),
        dataset_path=flat.get("dataset_path"),
        source_format="saelens",
        extra={"sae_lens_version": flat.get("sae_lens_version"), "neuronpedia_id": flat.get("neuronpedia_id")},
    )
    return cfg, scale


def _mlp_out_of(hook: str | None) -> str | None:
    """blocks.L.<anything> -> blocks.L.hook_mlp_out (where a transcoder reading layer L's MLP input writes)."""
    m = re.match(r"^blocks\.(\d+)\.", hook or "")
    return f"blocks.{m.group(1)}.hook_mlp_out" if m else None


def _read_cfg(folder: Path, weights: str, fmt: str) -> tuple[Path, dict]:
    """The folder's cfg.json as a dict; a missing or unreadable one says what the folder holds and what it needs."""
    cfg_file = folder / SAELENS_CFG
    if not cfg_file.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise SAEFormatError(str(folder), SAELENS_CFG, f"no {SAELENS_CFG} (the folder holds: {found})",
                             f"a {fmt} folder: {SAELENS_CFG} (architecture, d_in, d_sae, hook) beside {weights}")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise SAEFormatError(str(cfg_file), "(file)", f"invalid JSON ({err})", "a JSON object") from err
    if not isinstance(raw, dict):
        raise SAEFormatError(str(cfg_file), "(file)", type(raw).__name__, "a JSON object")
    return cfg_file, raw


def load_saelens(folder: Path, hook: str | None = None) -> SAE:
    cfg_file, raw = _read_cfg(folder, SAELENS_WEIGHTS, "SAELens")
    cfg, scale = _saelens_cfg(raw, str(cfg_file), hook)
    state = _read_safetensors(folder / SAELENS_WEIGHTS)
    if cfg.architecture.startswith("jumprelu") and "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    sf = state.pop("scaling_factor", state.pop("finetuning_scaling_factor", None))
    if sf is not None and not torch.allclose(sf, torch.ones_like(sf)):
        raise SAEFormatError(str(folder / SAELENS_WEIGHTS), "scaling_factor", "values other than 1",
                             "no finetuning scaling factor (not supported)")
    sae = _build(cfg, state, str(folder / SAELENS_WEIGHTS))
    if scale is not None:
        sae.fold_scaling_factor(float(scale))
    sparsity = folder / SAELENS_SPARSITY
    if sparsity.exists():
        sae.cfg.extra["log_sparsity_file"] = str(sparsity)
    return sae


def save_saelens(sae: SAE, folder: Path, dtype: torch.dtype = torch.float32, extra_meta: dict | None = None) -> None:
    """Write an SAE as a SAELens v6 folder (cfg.json with `metadata`, sae_weights.safetensors)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    cfg: dict[str, Any] = {
        "architecture": c.architecture, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": str(dtype).replace("torch.", ""),
        "device": "cpu", "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations, "reshape_activations": "none",
        "metadata": {
            "model_name": c.model_name, "hook_name": c.hook_name, "hook_head_index": None,
            "prepend_bos": c.prepend_bos, "context_size": c.context_size, "dataset_path": c.dataset_path,
            "sae_lens_version": "6.0.0", "sae_lens_training_version": "6.0.0", **(extra_meta or {}),
        },
    }
    if c.architecture.startswith("topk"):
        cfg["k"] = c.k
    if sae.is_transcoder:
        cfg["d_out"] = c.d_in
        cfg["hook_name_out"] = c.hook_name_out
        cfg["metadata"]["hook_name_out"] = c.hook_name_out
    names = type(sae).param_shapes(c.d_in, c.d_sae)
    save_file({n: getattr(sae, n).detach().to(dtype).contiguous() for n in names}, str(folder / SAELENS_WEIGHTS))
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=2) + "\n")


# ---------------------------------------------------------------- Gemma Scope
def _hook_from_path(path: Path) -> str | None:
    s = str(path)
    m = re.search(r"layer[_s.]*(\d+)", s)
    if not m:
        return None
    layer = int(m.group(1))
    if re.search(r"(^|[-_/])mlp([-_/]|$)", s):
        return f"blocks.{layer}.hook_mlp_out"
    if re.search(r"(^|[-_/])(att|attn)([-_/]|$)", s):
        return None  # attention SAEs read hook_z, which saescope does not hook
    return f"blocks.{layer}.hook_resid_post"


def load_gemmascope(file: Path, hook: str | None = None) -> SAE:
    try:
        with np.load(file) as data:
            state = {("W_" + k[2:] if k.startswith("w_") else k): torch.from_numpy(np.asarray(data[k])) for k in data}
    except Exception as err:
        raise SAEFormatError(str(file), "(file)", f"unreadable ({err})", "a numpy .npz archive") from err
    if "W_enc" not in state:
        raise SAEFormatError(str(file), "W_enc", f"no such array (have: {', '.join(sorted(state))})",
                             "Gemma Scope arrays W_enc, W_dec, b_enc, b_dec, threshold")
    d_in, d_sae = state["W_enc"].shape
    hook_name = hook or _hook_from_path(file)
    if hook_name is None:
        raise SAEFormatError(str(file), "hook", "no layer in the path",
                             "a path like .../layer_12/width_16k/... or an explicit --hook")
    cfg = SAEConfig(architecture="jumprelu", d_in=int(d_in), d_sae=int(d_sae), hook_name=hook_name,
                    apply_b_dec_to_input=False, source_format="gemmascope")
    return _build(cfg, state, str(file))


# ---------------------------------------------------------------- EleutherAI sparsify
def _sparsify_hook(folder: Path) -> str | None:
    m = re.search(r"layers\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$", folder.name)
    if not m:
        return None
    kind = {None: "hook_resid_post", "mlp": "hook_mlp_out"}.get(m.group(2), "hook_attn_out")
    return f"blocks.{m.group(1)}.{kind}"


def load_sparsify(folder: Path, hook: str | None = None) -> SAE:
    cfg_file, raw = _read_cfg(folder, SPARSIFY_WEIGHTS, "sparsify")
    wfile = str(folder / SPARSIFY_WEIGHTS)
    state = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    d_in = _int_field(raw, "d_in", str(cfg_file))
    k = _int_field(raw, "k", str(cfg_file))
    if "encoder.weight" not in state:
        raise SAEFormatError(wfile, "encoder.weight", f"no such tensor (have: {', '.join(sorted(state))})",
                             "sparsify tensors encoder.weight, encoder.bias, W_dec, b_dec")
    d_sae = state["encoder.weight"].shape[0]
    if raw.get("num_latents") and raw["num_latents"] != d_sae:
        raise SAEFormatError(str(cfg_file), "num_latents", raw["num_latents"], f"{d_sae} (rows of encoder.weight)")
    hook_name = hook or _sparsify_hook(folder)
    if hook_name is None:
        raise SAEFormatError(str(folder), "hook", f"folder name {folder.name!r}",
                             "a sparsify hookpoint folder like layers.6 or an explicit --hook")
    if raw.get("skip_connection") or raw.get("transcode"):
        raise SAEFormatError(str(cfg_file), "skip_connection/transcode", "true", "a plain SAE (transcoders not supported)")
    enc = state["encoder.weight"]
    mapped = {"W_enc": enc.T.contiguous(), "b_enc": state.get("encoder.bias", torch.zeros(d_sae)),
              "W_dec": state.get("W_dec", torch.empty(0)), "b_dec": state.get("b_dec", torch.empty(0))}
    if "W_dec" not in state or "b_dec" not in state:
        missing = [n for n in ("W_dec", "b_dec") if n not in state]
        raise SAEFormatError(wfile, missing[0], "no such tensor", f"shape {(d_sae, d_in) if missing[0] == 'W_dec' else (d_in,)}")
    cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=int(d_sae), hook_name=hook_name, k=k,
                    apply_b_dec_to_input=True, source_format="sparsify")
    return _build(cfg, mapped, wfile)


# ---------------------------------------------------------------- OpenAI sparse_autoencoder
def load_openai(file: Path, hook: str | None = None) -> SAE:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SAEFormatError(str(file), "(file)", f"unreadable ({err})", "a torch state dict") from err
    if not isinstance(sd, dict) or "encoder.weight" not in sd:
        raise SAEFormatError(str(file), "encoder.weight", "missing", "an OpenAI Autoencoder state dict")
    if hook is None:
        raise SAEFormatError(str(file), "hook", "none", "an explicit --hook (OpenAI files do not record one)")
    act = sd.get("activation", "ReLU")
    d_sae, d_in = sd["encoder.weight"].shape
    if "decoder.weight" not in sd or "pre_bias" not in sd or "latent_bias" not in sd:
        missing = [n for n in ("decoder.weight", "pre_bias", "latent_bias") if n not in sd][0]
        raise SAEFormatError(str(file), missing, "no such tensor", "OpenAI tensors encoder.weight, decoder.weight, pre_bias, latent_bias")
    state = {"W_enc": sd["encoder.weight"].T.contiguous(), "b_enc": sd["latent_bias"],
             "W_dec": sd["decoder.weight"].T.contiguous(), "b_dec": sd["pre_bias"]}
    if act == "TopK":
        k = int((sd.get("activation_state_dict") or {}).get("k", 0))
        cfg = SAEConfig(architecture="topk", d_in=int(d_in), d_sae=int(d_sae), hook_name=hook, k=k,
                        normalize_activations="layer_norm", source_format="openai")
    elif act == "ReLU":
        cfg = SAEConfig(architecture="standard", d_in=int(d_in), d_sae=int(d_sae), hook_name=hook, source_format="openai")
    else:
        raise SAEFormatError(str(file), "activation", repr(act), "ReLU or TopK")
    return _build(cfg, state, str(file))


# ---------------------------------------------------------------- circuit-tracer transcoders (one layer as an SAE)
def _load_circuit_tracer(path: Path, hook: str | None, file_match) -> SAE:
    """One layer of a circuit-tracer transcoder set or CLT as a transcoder SAE, for dashboards: the layer comes from
    a `layer_{i}.safetensors` file name or from --hook blocks.L.hook_mlp_in (a folder)."""
    from ..circuits.transcoders import load_clt, load_ct_layer, load_transcoder_set_folder, _read_config
    from ..models import parse_hook

    if file_match is not None:
        layer = int(file_match.group(1))
        from ..circuits.transcoders import TranscoderSet, _input_kind

        cfg = _read_config(path.parent)
        enc, b, skip = load_ct_layer(path, layer, cfg)
        ts = TranscoderSet(layer + 1, {layer: enc}, {layer: b}, {layer: skip} if skip is not None else {},
                           _input_kind(cfg, str(path.parent / "config.yaml")))
    else:
        if hook is None:
            raise SAEFormatError(str(path), "hook", "none", "--hook blocks.L.hook_mlp_in naming the layer of this "
                                 "circuit-tracer transcoder folder to load")
        layer = parse_hook(hook).layer
        clt = (path / "W_enc_0.safetensors").exists()
        ts = load_clt(path) if clt else load_transcoder_set_folder(path, layer + 1)
        if layer not in ts.encoders:
            raise SAEFormatError(str(path), "hook", repr(hook), f"a layer the folder holds ({', '.join(map(str, ts.layers))})")
    sae = ts.layer_sae(layer)
    sae.cfg.source_format = "circuit-tracer"
    return sae


# ---------------------------------------------------------------- dispatch
def _from_hub(ref: str) -> Path:
    ref = ref.removeprefix("hf://")
    parts = ref.strip("/").split("/")
    if len(parts) < 2:
        raise NotFound(f"SAE {ref!r} is neither a local path nor a hub reference 'owner/repo[/folder]'")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id, allow_patterns=[f"{sub}/*"] if sub else None))
    except Exception as err:
        raise NotFound(
            f"could not fetch SAE {ref!r} from the Hugging Face hub ({type(err).__name__}); no network here? "
            "saescope reads SAEs from local folders too: pass --sae /path/to/folder (SAELens cfg.json + "
            "sae_weights.safetensors, sparsify cfg.json + sae.safetensors, Gemma Scope params.npz, or an OpenAI .pt)"
        ) from err
    return root / sub if sub else root


def load_sae(ref: str | Path, hook: str | None = None) -> SAE:
    """Load an SAE from a folder or file on disk, or from the hub ('owner/repo/folder' or 'hf://...')."""
    path = Path(ref)
    release = None
    if not path.exists():
        if str(ref).startswith(("/", ".", "~")):
            raise NotFound(f"SAE path {str(ref)!r} does not exist")
        from ..releases import fetch_release, looks_like_release, resolve_release

        if looks_like_release(str(ref)):  # RELEASE/SAE_ID from SAELens's registry of pretrained SAEs
            release = resolve_release(str(ref))
            for note in release.notes:
                log.info("%s: %s", ref, note)
            path, hook = fetch_release(release), hook or release.hook_name
        else:
            path = _from_hub(str(ref))
    source = str(ref)
    ct_layer = re.fullmatch(r"layer_(\d+)\.safetensors", path.name)
    if (path.is_dir() and ((path / "W_enc_0.safetensors").exists() or any(path.glob("layer_*.safetensors")))) or \
            (path.is_file() and ct_layer):
        sae = _load_circuit_tracer(path, hook, ct_layer)
    elif path.is_dir():
        if (path / SAELENS_WEIGHTS).exists():
            sae = load_saelens(path, hook)
        elif (path / SPARSIFY_WEIGHTS).exists():
            sae = load_sparsify(path, hook)
        elif (path / GEMMASCOPE_WEIGHTS).exists():
            sae = load_gemmascope(path / GEMMASCOPE_WEIGHTS, hook)
        else:
            found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
            raise SAEFormatError(str(path), "(folder)", f"files {found}",
                                 f"{SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens), cfg.json + {SPARSIFY_WEIGHTS} "
                                 f"(sparsify) or {GEMMASCOPE_WEIGHTS} (Gemma Scope)")
    elif path.suffix == ".npz":
        sae = load_gemmascope(path, hook)
    elif path.suffix in (".pt", ".pth"):
        sae = load_openai(path, hook)
    else:
        raise SAEFormatError(str(path), "(file)", f"suffix {path.suffix!r}", "a folder, a .npz (Gemma Scope) or a .pt (OpenAI)")
    sae.cfg.source = source
    if release is not None and release.neuronpedia_id:
        sae.cfg.extra["neuronpedia_id"] = release.neuronpedia_id
    if sae.cfg.hook_name is None:
        raise SAEFormatError(source, "hook_name", "none", "a hook name in the config or an explicit --hook")
    return sae
