"""Load a causal LM with transformers and read activations at SAELens/TransformerLens hook names.

Hook names map onto the Hugging Face module tree with forward hooks:

    blocks.{L}.hook_resid_pre   input of decoder layer L        (== hidden_states[L])
    blocks.{L}.hook_resid_post  output of decoder layer L       (== hidden_states[L+1], except the last
                                                                  layer, whose hidden_states entry is after
                                                                  the final norm)
    blocks.{L}.hook_mlp_out     output of the MLP of layer L    (Gemma-2: after post_feedforward_layernorm)
    blocks.{L}.hook_attn_out    output of attention of layer L  (Gemma-2: after post_attention_layernorm)
    blocks.{L}.hook_mlp_in      input of the MLP of layer L, after its norm (what transcoders read; aliases
                                blocks.{L}.ln2.hook_normalized and blocks.{L}.mlp.hook_in)
    blocks.{L}.hook_resid_mid   input of the MLP's norm (residual stream between attention and MLP)

The forward pass stops right after the hooked module, so later layers cost nothing.

The public hook API (like TransformerLens's `run_with_hooks`), used by reading (`activations_multi`) and by the
interventions (precompute.interventions):

    lm.hook_point("blocks.3.hook_resid_post")      -> HookPoint(name, module, pre): the HF module it lives on
    with lm.hooks({name: fn, ...}): lm.model(...)   fn(activation) -> a replacement, or None to leave it
    lm.run_with_hooks(ids, [(name, fn)], stop_at=name, **forward_kwargs)
    raise StopForward                               inside a hook: end the pass (run_with_hooks returns None)
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SetupError, UserError

log = logging.getLogger(__name__)

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "hook_mlp_in", "hook_resid_mid")
HOOK_ALIASES = {"ln2.hook_normalized": "hook_mlp_in", "mlp.hook_in": "hook_mlp_in", "mlp.hook_out": "hook_mlp_out"}
HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in (*HOOK_KINDS, *HOOK_ALIASES)) + r")$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(SetupError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


class StopForward(Exception):
    """Raised inside a hook to end the forward pass once the wanted activation is captured (run_with_hooks and
    activations_multi catch it)."""


HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]  # activation (B, T, d) -> replacement, or None: unchanged


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name lives in the HF module tree: pre=True means the activation is `module`'s input
    (hidden_states, as a forward pre-hook sees it), pre=False its output (the first element of a tuple output)."""

    name: str
    module: nn.Module
    pre: bool


@dataclass(frozen=True)
class HookSpec:
    layer: int
    kind: str  # one of HOOK_KINDS

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"


def parse_hook(name: str, n_layers: int | None = None) -> HookSpec:
    m = HOOK_RE.match(name)
    if not m:
        raise UserError(
            f"unknown hook name {name!r}; valid: blocks.<layer>.<kind> with kind one of {', '.join(HOOK_KINDS)}"
        )
    spec = HookSpec(int(m.group(1)), HOOK_ALIASES.get(m.group(2), m.group(2)))
    if n_layers is not None and not 0 <= spec.layer < n_layers:
        raise UserError(f"hook {name!r} names layer {spec.layer}, but the model has layers 0..{n_layers - 1}")
    return spec


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of x86 CPUs with bf16 dot products
# 0 (default): auto means float32 on every CPU (stored values equal an fp32 recompute); auto: bfloat16 where the CPU
# has native bf16 (1.7x faster forward+encode measured on an AVX512-BF16 CPU, values within verify's bf16 bound);
# 1: bfloat16 on every CPU
CPU_BF16_ENV = "SAESCOPE_CPU_BF16"


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo.

    Elsewhere (no /proc/cpuinfo, ARM, older x86) False: bf16 would be emulated and slower than float32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(f in flags for f in CPU_BF16_FLAGS)


def resolve_dtype(dtype: str, device: str, cpuinfo: str | None = None) -> torch.dtype:
    """The model's dtype. auto: bfloat16 on CUDA, float32 on CPU; with $SAESCOPE_CPU_BF16=auto, bfloat16 on CPUs
    with native bf16 (see cpu_has_native_bf16); =1: bfloat16 on every CPU."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        if device != "cpu":
            return torch.float32
        env = os.environ.get(CPU_BF16_ENV, "0").strip().lower()
        if env not in ("auto", "0", "1"):
            raise UserError(f"${CPU_BF16_ENV}={env!r}; valid: auto (follow the CPU's flags), 0 (float32), 1 (bfloat16)")
        native = cpu_has_native_bf16(cpuinfo) if env == "auto" else env == "1"
        return torch.bfloat16 if native else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32', 'bfloat16' or 'float16' from a torch dtype or its str() as stored ('torch.bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return name


def _hub_hint(name: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model {name!r}: it is not a local folder and the Hugging Face hub could not be "
        f"reached or has no such repo ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
        "With no network, pass a local folder holding config.json, the weights (*.safetensors) and the "
        "tokenizer files, e.g. the embedded default made by `saescope convert-default`."
    )


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise ModelLoadError(f"could not load the tokenizer in {name_or_path}: {err}") from err
        raise _hub_hint(name_or_path, err) from err
    return tok


def _first_module(model: nn.Module, paths: tuple[str, ...], kind: type) -> nn.Module | None:
    """The first dotted attribute path of `model` that leads to an instance of `kind`."""
    for path in paths:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, kind):
            return obj
    return None


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks for GPT-2, GPT-NeoX, Llama, Gemma-2 and similar layouts."""
    found = _first_module(model, ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                                  "transformer.layers"), nn.ModuleList)
    if found is not None:
        return found
    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}")


def submodule(layer: nn.Module, kind: str, model_type: str) -> nn.Module:
    """The module whose *output* is the activation at hook `kind` within one decoder layer."""
    if kind == "hook_mlp_out":
        names = ("post_feedforward_layernorm",) if model_type.startswith("gemma2") or model_type.startswith("gemma3") else ()
        names += ("mlp", "feed_forward")
    else:
        names = ("post_attention_layernorm",) if model_type.startswith("gemma2") or model_type.startswith("gemma3") else ()
        names += ("self_attn", "attn", "attention")
    for n in names:
        mod = getattr(layer, n, None)
        if isinstance(mod, nn.Module):
            return mod
    raise ModelLoadError(f"cannot find the module for {kind} in {type(layer).__name__} (looked for {names})")


def _pre_hook(fn: HookFn, owner: int | None):
    def pre_hook(_mod, args, kwargs):
        if owner is not None and threading.get_ident() != owner:
            return None
        if args:
            new = fn(args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        new = fn(kwargs["hidden_states"])
        return None if new is None else (args, {**kwargs, "hidden_states": new})
    return pre_hook


def _post_hook(fn: HookFn, owner: int | None):
    def post_hook(_mod, _args, out):
        if owner is not None and threading.get_ident() != owner:
            return None
        if isinstance(out, (tuple, list)):
            new = fn(out[0])
            return None if new is None else (new,) + tuple(out[1:])
        return fn(out)
    return post_hook


def cache_kwarg(model: nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` (transformers >= 5.2x; `past_key_values` is deprecated there)
    or `past_key_values` (older releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(out):
    """The KV cache a forward pass returned (under either name)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _mlp_norm(layer: nn.Module, model_type: str) -> nn.Module:
    """The norm in front of the MLP (its output is the MLP's input in every supported pre-norm layout)."""
    for n in ("pre_feedforward_layernorm", "ln_2", "post_attention_layernorm"):
        mod = getattr(layer, n, None)
        if isinstance(mod, nn.Module) and not (n == "post_attention_layernorm" and model_type.startswith(("gemma2", "gemma3"))):
            return mod
    raise ModelLoadError(f"cannot find the norm in front of the MLP in {type(layer).__name__}")


def hook_site(layer: nn.Module, kind: str, model_type: str) -> tuple[nn.Module, str]:
    """(module, 'pre' | 'post'): the activation at hook `kind` is that module's first input ('pre') or output."""
    if kind == "hook_resid_pre":
        return layer, "pre"
    if kind == "hook_resid_post":
        return layer, "post"
    if kind == "hook_mlp_in":
        return submodule(layer, "hook_mlp_out", ""), "pre"  # the MLP module itself, not Gemma's post-norm
    if kind == "hook_resid_mid":
        return _mlp_norm(layer, model_type), "pre"
    return submodule(layer, kind, model_type), "post"


def final_norm(model: nn.Module) -> nn.Module | None:
    return _first_module(model, ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                                 "model.final_layernorm"), nn.Module)


class HookedLM:
    """A transformers causal LM plus the hook machinery to read one activation and stop early."""

    def __init__(self, model: nn.Module, tokenizer, name: str, device: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.layers = decoder_layers(model)
        self.model_type = getattr(model.config, "model_type", "")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def hook_width(self, hook: str) -> int:
        parse_hook(hook, self.n_layers)
        return self.d_model

    def activations(
        self, input_ids: torch.Tensor, hook: str, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activation at `hook` for a batch of token ids: (B, T) -> (B, T, d_model), float32.

        Runs only the layers up to the hook (a hook raises to end the pass)."""
        return self.activations_multi(input_ids, [hook], attention_mask)[hook]

    def hook_point(self, hook: str) -> HookPoint:
        """The module (and side: input or output) that carries the activation named `hook`."""
        spec = parse_hook(hook, self.n_layers)
        module, where = hook_site(self.layers[spec.layer], spec.kind, self.model_type)
        return HookPoint(spec.name, module, where == "pre")

    @contextmanager
    def hooks(self, fns: Mapping[str, HookFn] | Iterable[tuple[str, HookFn]],
              this_thread_only: bool = True) -> Iterator[None]:
        """Install hooks for the forward passes inside the block: fn(activation) returns its replacement (or None
        to leave it as it is) and may raise StopForward. Several functions on one hook run in the order given.
        With this_thread_only (the default) a hook fires only in the thread that installed it, so forward passes
        of other threads (a worker serving other requests) are not affected."""
        items = list(fns.items()) if isinstance(fns, Mapping) else list(fns)
        owner = threading.get_ident() if this_thread_only else None
        with ExitStack() as stack:
            for name, fn in items:
                point = self.hook_point(name)
                handle = (point.module.register_forward_pre_hook(_pre_hook(fn, owner), with_kwargs=True) if point.pre
                          else point.module.register_forward_hook(_post_hook(fn, owner)))
                stack.callback(handle.remove)
            yield

    def base_model(self) -> nn.Module:
        """The transformer without its LM head (what a pass that stops at a hook runs)."""
        return getattr(self.model, self.model.base_model_prefix, None) or self.model

    def run_with_hooks(self, input_ids: torch.Tensor, fwd_hooks: Iterable[tuple[str, HookFn]] = (), *,
                       stop_at: str | Iterable[str] | None = None, **forward_kwargs):
        """One forward pass with `fwd_hooks` [(hook name, fn)] installed (see `hooks`); returns the model's output.

        stop_at=hook (or several): the pass runs the base model (no LM head) and ends as soon as that hook (every
        one of them) has fired, after the fns given for it; returns None. A hook raising StopForward also ends the
        pass (returns None)."""
        hooks = list(fwd_hooks)
        if stop_at is not None:
            waiting = {stop_at} if isinstance(stop_at, str) else set(stop_at)

            def stopper(name: str) -> HookFn:
                def stop(_t: torch.Tensor) -> None:
                    waiting.discard(name)
                    if not waiting:
                        raise StopForward
                return stop
            hooks += [(h, stopper(h)) for h in list(waiting)]
        module = self.base_model() if stop_at is not None else self.model
        with self.hooks(hooks):
            try:
                return module(input_ids=input_ids.to(self.device), **forward_kwargs)
            except StopForward:
                return None

    @torch.no_grad()
    def activations_multi(
        self, input_ids: torch.Tensor, hooks: list[str], attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Activations at several hooks from one forward pass: (B, T) -> {hook: (B, T, d_model)}, float32.

        Every hook is registered at once; the pass ends as soon as the last of them (the deepest) has fired,
        so layers after the deepest hook cost nothing and the shared layers run once."""
        names = list(dict.fromkeys(hooks))
        for h in names:
            parse_hook(h, self.n_layers)
        captured: dict[str, torch.Tensor] = {}

        def grabber(name: str) -> HookFn:
            def grab(t: torch.Tensor) -> None:
                captured[name] = t.detach()
            return grab

        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        self.run_with_hooks(input_ids, [(h, grabber(h)) for h in names], stop_at=names,
                            attention_mask=attention_mask, use_cache=False)
        missing = [h for h in names if h not in captured]
        if missing:
            raise SetupError(f"hooks {missing} did not fire; the module layout of {type(self.model).__name__} "
                               "is not supported")
        return {h: captured[h].float() for h in hooks}

    def unembedding(self) -> torch.Tensor:
        """W_U as (d_model, vocab), float32."""
        return self.model.get_output_embeddings().weight.detach().float().T

    def final_norm_gain(self) -> torch.Tensor | None:
        """The elementwise gain of the final norm (Gemma's (1 + weight) convention included), or None."""
        norm = final_norm(self.model)
        w = getattr(norm, "weight", None) if norm is not None else None
        if w is None:
            return None
        w = w.detach().float()
        if self.model_type.startswith("gemma"):
            w = 1.0 + w
        return w


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto") -> HookedLM:
    """Load a causal LM and its tokenizer from a hub id or a local folder."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tok = load_tokenizer(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=torch_dtype)
    except (OSError, ValueError) as err:
        if Path(name_or_path).is_dir():
            raise ModelLoadError(f"could not load the model in {name_or_path}: {err}") from err
        raise _hub_hint(name_or_path, err) from err
    model.to(device)
    if device == "cpu":
        # a Ray task (or any launcher) that sets OMP_NUM_THREADS for its CPU share is believed
        threads = os.environ.get("SAESCOPE_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1
        torch.set_num_threads(max(1, int(threads)))
    log.info("loaded %s (%s, %d layers, d_model %d) on %s in %s", name_or_path, type(model).__name__,
             model.config.num_hidden_layers, model.config.hidden_size, device, dtype_name(torch_dtype))
    return HookedLM(model, tok, name_or_path, device)
