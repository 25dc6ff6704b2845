"""Replacement components for attribution graphs: per-layer transcoder sets and cross-layer transcoders (CLTs).

A `TranscoderSet` holds, for each layer that has one, an encoder (W_enc (d, F), b_enc, activation) reading that
layer's MLP input (`hook_mlp_in`) or the residual stream before the MLP's norm (`hook_resid_mid`), and decoders
writing into the MLP outputs of that layer (a per-layer transcoder) or of that layer and every later one (a CLT).
Layers without a transcoder are all error node in the graph.

Formats read here:
  * SAELens transcoder folders (architecture transcoder / skip_transcoder / jumprelu_transcoder / ...), one per
    layer, through `saes.load_sae`;
  * circuit-tracer per-layer files (`layer_{i}.safetensors`: W_enc (F, d), W_dec (F, d), b_enc, b_dec,
    optional `activation_function.threshold`, `W_skip` (d, d) applied as x @ W_skip.T) beside a config.yaml
    (`model_kind: transcoder_set`, `feature_input_hook`, `feature_output_hook`, optional `transcoders` list);
  * circuit-tracer CLT folders (`W_enc_{i}.safetensors`: W_enc_{i} (F, d), b_enc_{i}, b_dec_{i}, threshold_{i};
    `W_dec_{i}.safetensors`: W_dec_{i} (F, n_layers - i, d); optional `W_skip_{i}` (d, d) applied as x @ W_skip),
    config keys `model_kind: cross_layer_transcoder`, `activation` (relu | jump_relu | topk), `k`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError
from ..models import parse_hook
from ..saes import SAE, SAEConfig, SAEFormatError, load_sae
from ..saes.transcoder import Transcoder, transcoder_architecture

INPUT_KINDS = ("hook_mlp_in", "hook_resid_mid")
# circuit-tracer / TransformerLens names of the hooks transcoders read and write
CT_INPUT = {"mlp.hook_in": "hook_mlp_in", "ln2.hook_normalized": "hook_mlp_in", "hook_mlp_in": "hook_mlp_in",
            "hook_resid_mid": "hook_resid_mid"}
CT_OUTPUT = {"mlp.hook_out": "hook_mlp_out", "hook_mlp_out": "hook_mlp_out"}


@dataclass
class LayerEncoder:
    """The features read at one layer: pre = x @ W_enc + b_enc, acts = act(pre); decoders to layers l.. l+n_out-1."""

    layer: int
    W_enc: torch.Tensor  # (d, F)
    b_enc: torch.Tensor  # (F,)
    W_dec: torch.Tensor  # (F, n_out, d)
    activation: str = "relu"  # relu | jump_relu | topk
    threshold: torch.Tensor | None = None  # (F,) for jump_relu
    k: int | None = None  # topk
    name: str = ""

    @property
    def d_features(self) -> int:
        return int(self.W_enc.shape[1])

    @property
    def out_layers(self) -> range:
        return range(self.layer, self.layer + int(self.W_dec.shape[1]))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc + self.b_enc

    def act(self, pre: torch.Tensor) -> torch.Tensor:
        if self.activation == "jump_relu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.activation == "topk":
            top = pre.topk(int(self.k or 0), dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pre(x))


@dataclass
class TranscoderSet:
    """Encoders by source layer, output biases and skips by output layer; everything in one dtype."""

    n_layers: int
    encoders: dict[int, LayerEncoder]
    b_dec: dict[int, torch.Tensor] = field(default_factory=dict)  # output layer -> (d,)
    W_skip: dict[int, torch.Tensor] = field(default_factory=dict)  # output layer -> (d_out, d_in): x @ W.T
    input_kind: str = "hook_mlp_in"
    kind: str = "transcoder_set"  # or cross_layer_transcoder
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.input_kind not in INPUT_KINDS:
            raise UserError(f"transcoder input hook kind {self.input_kind!r}; valid: {', '.join(INPUT_KINDS)}")
        for l, enc in self.encoders.items():
            if not 0 <= l < self.n_layers or enc.out_layers.stop > self.n_layers:
                raise UserError(f"transcoder at layer {l} writes to layers {list(enc.out_layers)}, "
                                f"but the model has layers 0..{self.n_layers - 1}")

    @property
    def layers(self) -> list[int]:
        return sorted(self.encoders)

    @property
    def covered(self) -> set[int]:
        """Output layers whose MLP is (partly) replaced by features."""
        return {o for e in self.encoders.values() for o in e.out_layers}

    def to(self, dtype: torch.dtype, device: str | torch.device | None = None) -> "TranscoderSet":
        def c(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        encs = {l: LayerEncoder(e.layer, c(e.W_enc), c(e.b_enc), c(e.W_dec), e.activation, c(e.threshold), e.k, e.name)
                for l, e in self.encoders.items()}
        return TranscoderSet(self.n_layers, encs, {l: c(b) for l, b in self.b_dec.items()},
                             {l: c(w) for l, w in self.W_skip.items()}, self.input_kind, self.kind, list(self.names))

    def input_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.input_kind}"

    def skip(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = self.W_skip.get(layer)
        return torch.zeros_like(x) if w is None else x.to(w.dtype) @ w.T

    def reconstruction(self, acts: dict[int, torch.Tensor], x_in: dict[int, torch.Tensor], layer: int) -> torch.Tensor:
        """The features' part of MLP output `layer` (T, d): Σ_src acts_src @ W_dec[:, layer - src] + b_dec + skip."""
        out = None
        for src, enc in self.encoders.items():
            if layer in enc.out_layers:
                part = acts[src] @ enc.W_dec[:, layer - src]
                out = part if out is None else out + part
        if out is None:
            return None
        if layer in self.b_dec:
            out = out + self.b_dec[layer]
        if layer in self.W_skip:
            out = out + self.skip(layer, x_in[layer])
        return out

    def layer_sae(self, layer: int) -> Transcoder:
        """One layer's features as a saescope SAE (for dashboards): its decoder into its own layer's MLP output."""
        enc = self.encoders[layer]
        arch = transcoder_architecture(enc.activation, layer in self.W_skip and enc.W_dec.shape[1] == 1)
        from ..saes import sae_class

        cfg = SAEConfig(architecture=arch, d_in=int(enc.W_enc.shape[0]), d_sae=enc.d_features,
                        hook_name=self.input_hook(layer), hook_name_out=f"blocks.{layer}.hook_mlp_out", k=enc.k,
                        apply_b_dec_to_input=False, source_format=self.kind)
        sae = sae_class(arch)(cfg)
        with torch.no_grad():
            sae.W_enc.copy_(enc.W_enc.float())
            sae.b_enc.copy_(enc.b_enc.float())
            sae.W_dec.copy_(enc.W_dec[:, 0].float())
            sae.b_dec.copy_(self.b_dec.get(layer, torch.zeros(cfg.d_in)).float())
            if enc.threshold is not None:
                sae.threshold.copy_(enc.threshold.float())
            if sae.has_skip:
                sae.W_skip.copy_(self.W_skip[layer].float())
        return sae.eval()

    @classmethod
    def from_saes(cls, saes: list[SAE], n_layers: int) -> "TranscoderSet":
        """Per-layer transcoders (saescope/SAELens Transcoder objects), one per layer at most."""
        encs: dict[int, LayerEncoder] = {}
        b_dec, skips, kinds = {}, {}, set()
        for sae in saes:
            if not getattr(sae, "is_transcoder", False):
                raise UserError(f"{sae.cfg.source or sae.cfg.hook_name}: architecture {sae.cfg.architecture!r} is not a "
                                "transcoder; attribution graphs need transcoders (transcoder, skip_transcoder, "
                                "jumprelu_transcoder, ...) reading an MLP's input and writing its output")
            spec = parse_hook(sae.cfg.hook_name or "", n_layers)
            out = parse_hook(sae.cfg.hook_name_out or f"blocks.{spec.layer}.hook_mlp_out", n_layers)
            if spec.kind not in INPUT_KINDS or out.kind != "hook_mlp_out" or out.layer != spec.layer:
                raise UserError(f"transcoder {sae.cfg.hook_name} -> {sae.cfg.hook_name_out}: graphs need transcoders "
                                "from blocks.L.hook_mlp_in (or hook_resid_mid) to blocks.L.hook_mlp_out of the same layer")
            if spec.layer in encs:
                raise UserError(f"two transcoders at layer {spec.layer}; give one per layer")
            kinds.add(spec.kind)
            arch = sae.cfg.architecture
            act = "jump_relu" if arch.startswith("jumprelu") else "topk" if arch.startswith("topk") else "relu"
            encs[spec.layer] = LayerEncoder(spec.layer, sae.W_enc.detach(), sae.b_enc.detach(),
                                            sae.W_dec.detach()[:, None, :], act,
                                            getattr(sae, "threshold", None) if act == "jump_relu" else None,
                                            sae.cfg.k, sae.cfg.source or sae.cfg.hook_name or "")
            if act == "jump_relu":
                encs[spec.layer].threshold = sae.threshold.detach()
            b_dec[spec.layer] = sae.b_dec.detach()
            if getattr(sae, "has_skip", False):
                skips[spec.layer] = sae.W_skip.detach()
        if len(kinds) > 1:
            raise UserError(f"transcoders read different hooks ({', '.join(sorted(kinds))}); use one kind")
        return cls(n_layers, encs, b_dec, skips, kinds.pop() if kinds else "hook_mlp_in", "transcoder_set",
                   [e.name for e in encs.values()])


# ---------------------------------------------------------------- circuit-tracer formats
def _read_config(folder: Path) -> dict:
    for name in ("config.yaml", "config.yml", "config.json"):
        f = folder / name
        if f.is_file():
            text = f.read_text()
            if name.endswith("json"):
                return json.loads(text)
            import yaml

            return yaml.safe_load(text) or {}
    return {}


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:
        raise SAEFormatError(str(path), "(file)", f"unreadable ({err})", "a safetensors file") from err


def _input_kind(cfg: dict, file: str) -> str:
    hook = cfg.get("feature_input_hook", "mlp.hook_in")
    if hook not in CT_INPUT:
        raise SAEFormatError(file, "feature_input_hook", repr(hook), f"one of {', '.join(CT_INPUT)}")
    out = cfg.get("feature_output_hook", "mlp.hook_out")
    if out not in CT_OUTPUT:
        raise SAEFormatError(file, "feature_output_hook", repr(out), f"one of {', '.join(CT_OUTPUT)}")
    return CT_INPUT[hook]


def _activation(cfg: dict, has_threshold: bool, file: str) -> tuple[str, int | None]:
    act = cfg.get("activation") or ("jump_relu" if has_threshold else "relu")
    act = {"jumprelu": "jump_relu"}.get(act, act)
    if act not in ("relu", "jump_relu", "topk"):
        raise SAEFormatError(file, "activation", repr(act), "relu, jump_relu or topk")
    k = cfg.get("k")
    if act == "topk" and (not isinstance(k, int) or k <= 0):
        raise SAEFormatError(file, "k", repr(k), "a positive integer for activation topk")
    if act == "jump_relu" and not has_threshold:
        raise SAEFormatError(file, "threshold", "missing", "a threshold tensor for activation jump_relu")
    return act, k if act == "topk" else None


def load_ct_layer(file: Path, layer: int, cfg: dict | None = None) -> tuple[LayerEncoder, torch.Tensor, torch.Tensor | None]:
    """One circuit-tracer per-layer transcoder file -> (encoder, b_dec, W_skip or None)."""
    cfg = cfg or {}
    st = _load(file)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        if name not in st:
            raise SAEFormatError(str(file), name, f"no such tensor (have: {', '.join(sorted(st))})",
                                 "circuit-tracer tensors W_enc (F, d), W_dec (F, d), b_enc (F,), b_dec (d,)")
    F, d = st["W_enc"].shape
    if tuple(st["W_dec"].shape) != (F, d) or tuple(st["b_enc"].shape) != (F,) or tuple(st["b_dec"].shape) != (d,):
        raise SAEFormatError(str(file), "W_dec/b_enc/b_dec", "shapes " + ", ".join(
            f"{n} {tuple(st[n].shape)}" for n in ("W_dec", "b_enc", "b_dec")), f"W_dec ({F}, {d}), b_enc ({F},), b_dec ({d},)")
    thr = st.get("activation_function.threshold", st.get("threshold"))
    act, k = _activation(cfg, thr is not None, str(file))
    enc = LayerEncoder(layer, st["W_enc"].T.contiguous().float(), st["b_enc"].float(), st["W_dec"][:, None, :].float(),
                       act, None if thr is None else thr.reshape(-1).float(), k, str(file))
    skip = st.get("W_skip")
    return enc, st["b_dec"].float(), None if skip is None else skip.float()


def load_transcoder_set_folder(folder: Path, n_layers: int) -> TranscoderSet:
    cfg = _read_config(folder)
    kind = _input_kind(cfg, str(folder / "config.yaml"))
    files: dict[int, Path] = {}
    if cfg.get("transcoders"):
        for i, p in enumerate(cfg["transcoders"]):
            if p is None:
                continue
            p = Path(str(p).removeprefix("file://"))
            files[i] = p if p.is_absolute() else folder / p
    else:
        for f in folder.glob("layer_*.safetensors"):
            m = re.fullmatch(r"layer_(\d+)\.safetensors", f.name)
            if m:
                files[int(m.group(1))] = f
    if not files:
        raise SAEFormatError(str(folder), "(folder)", "no layer_{i}.safetensors files and no `transcoders` list",
                             "a circuit-tracer transcoder set")
    encs, b_dec, skips = {}, {}, {}
    for layer, f in sorted(files.items()):
        enc, b, s = load_ct_layer(f, layer, cfg)
        encs[layer], b_dec[layer] = enc, b
        if s is not None:
            skips[layer] = s
    return TranscoderSet(n_layers, encs, b_dec, skips, kind, "transcoder_set", [str(f) for f in files.values()])


def load_clt(folder: Path, n_layers: int | None = None) -> TranscoderSet:
    cfg = _read_config(folder)
    kind = _input_kind(cfg, str(folder / "config.yaml"))
    enc_files = sorted(folder.glob("W_enc_*.safetensors"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    n = len(enc_files)
    if n == 0:
        raise SAEFormatError(str(folder), "(folder)", "no W_enc_{i}.safetensors", "a circuit-tracer CLT folder")
    n_layers = n_layers or n
    encs, b_dec, skips = {}, {}, {}
    for i in range(n):
        fe, fd = folder / f"W_enc_{i}.safetensors", folder / f"W_dec_{i}.safetensors"
        if not fe.is_file() or not fd.is_file():
            raise SAEFormatError(str(folder), f"W_enc_{i}/W_dec_{i}", "missing file",
                                 f"W_enc_i.safetensors and W_dec_i.safetensors for every layer 0..{n - 1}")
        e, dd = _load(fe), _load(fd)
        for name in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
            if name not in e:
                raise SAEFormatError(str(fe), name, f"no such tensor (have: {', '.join(sorted(e))})", "a CLT encoder file")
        if f"W_dec_{i}" not in dd:
            raise SAEFormatError(str(fd), f"W_dec_{i}", f"no such tensor (have: {', '.join(sorted(dd))})", "a CLT decoder file")
        W_enc, W_dec = e[f"W_enc_{i}"], dd[f"W_dec_{i}"]
        F, d = W_enc.shape
        if tuple(W_dec.shape) != (F, n - i, d):
            raise SAEFormatError(str(fd), f"W_dec_{i}", f"shape {tuple(W_dec.shape)}", f"({F}, {n - i}, {d})")
        thr = e.get(f"threshold_{i}")
        act, k = _activation(cfg, thr is not None, str(fe))
        encs[i] = LayerEncoder(i, W_enc.T.contiguous().float(), e[f"b_enc_{i}"].float(), W_dec.float(), act,
                               None if thr is None else thr.reshape(-1).float(), k, f"{folder}#{i}")
        b_dec[i] = e[f"b_dec_{i}"].float()
        skip = e.get(f"W_skip_{i}")
        if skip is not None:
            skips[i] = skip.float().T.contiguous()  # circuit-tracer's CLT applies x @ W_skip[i]
    return TranscoderSet(n_layers, encs, b_dec, skips, kind, "cross_layer_transcoder", [str(folder)])


def load_transcoders(refs: list[str] | str, n_layers: int) -> TranscoderSet:
    """A circuit-tracer folder (config.yaml with model_kind, or layer_*/W_enc_* files), or a list of SAELens
    transcoder folders (one per layer; any subset of layers)."""
    if isinstance(refs, (str, Path)):
        refs = [str(refs)]
    if len(refs) == 1 and Path(refs[0]).is_dir():
        folder = Path(refs[0])
        cfg = _read_config(folder)
        kind = cfg.get("model_kind")
        if kind == "cross_layer_transcoder" or (kind is None and (folder / "W_enc_0.safetensors").is_file()):
            return load_clt(folder, n_layers)
        if kind == "transcoder_set" or (kind is None and any(folder.glob("layer_*.safetensors"))):
            return load_transcoder_set_folder(folder, n_layers)
        if kind is not None:
            raise SAEFormatError(str(folder), "model_kind", repr(kind), "transcoder_set or cross_layer_transcoder")
    return TranscoderSet.from_saes([load_sae(r) for r in refs], n_layers)
