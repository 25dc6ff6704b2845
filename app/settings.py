"""Every default of the online side, in one place: the dashboard server and the model worker.

The CLI passes these to the server and worker, the routes read them for their query limits, the templates get
them through the Jinja globals, and the tests import them; no number here is written down anywhere else.
Offline defaults (embedded model, precompute, train-sae) live in precompute/config.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from saescope.precompute import __version__
from saescope.precompute.config import LIMITS


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    page_size: int = 50  # features per page of an SAE's list
    max_page_size: int = 500
    search_page_size: int = 25
    max_search_page_size: int = 200
    max_page: int = 1_000_000  # largest page number of a list or search (bounds the store's row offsets)
    max_query_chars: int = 200
    show_left: int = 24  # tokens shown left of an example's marked token by default
    show_right: int = 8
    max_show: int = 1024
    max_prompt_chars: int = 4000  # prompts typed into the dashboard (inspect, "try your own text")
    inspect_k: int = 20  # features listed for a prompt
    token_detail_k: int = 10  # features listed for one token of a prompt
    search_top: int = LIMITS.search_top  # features listed by the inspect page's search across every SAE
    max_inspect_k: int = 200
    max_list: int = 200  # features in one shared list (the list lives in its URL)
    max_note_chars: int = 500
    dense_share: float = 0.01  # the feature list calls a feature dense at or above this share of tokens
    cache_bytes: int = 512 * 2**20  # whole-response page cache
    prewarm_max_features: int = 16_384  # pre-render feature pages only for stores this small (cold pages: ~10 ms)
    worker_restart_max_s: float = 30.0  # longest wait between restarts of a dead child worker
    worker_load_guess_s: float = 10.0  # "restarting, about N s" before a worker's load time was measured
    worker_poll_s: float = 2.0  # how often a page showing "worker unavailable" asks /live/status again
    health_max_age_s: float = 2.0  # how long a worker health answer is trusted
    shutdown_wait_s: float = 10.0  # how long shutdown waits for the page being pre-rendered


@dataclass(frozen=True)
class WorkerSettings:
    host: str = "127.0.0.1"
    port: int = 8001
    max_prompt_tokens: int = LIMITS.max_prompt_tokens  # admission also caps it by the model's position limit
    max_text_chars: int = 20_000
    max_batch: int = 16
    max_generation_batch: int = 8  # steering requests decoded together in one KV-cached batch
    generation_wait_ms: float = 30.0  # a steering request waits this long for company (~1% of a 32-token request)
    batch_wait_ms: float = 5.0
    max_queue: int = 64
    request_timeout_s: float = 30.0
    client_timeout_s: float = 60.0  # how long the dashboard waits for a worker answer
    top_k: int = 10  # features per answer of /top_features and /token_features unless asked otherwise
    max_k: int = 200
    max_token_k: int = 100  # features per token of /token_features
    # interventions (steering, ablation, attribution): the limits are precompute.config.LIMITS, enforced there
    max_edits: int = LIMITS.max_edits  # feature edits in one request
    max_edit_chars: int = 40  # one URL edit FEATURE:MODE:VALUE (e.g. 123:clamp:-12.5e-3), parsed by app/web/edits.py
    max_new_tokens: int = LIMITS.max_new_tokens  # tokens one steering request may generate
    default_new_tokens: int = LIMITS.default_new_tokens
    generation_time_s: float = LIMITS.generation_time_s  # a generation stops after this long (the answer says so)
    max_abs_value: float = LIMITS.max_abs_value  # |steering coefficient| and |clamp value|
    attribution_top: int = LIMITS.attribution_top  # features listed by attribution
    attribution_verify: int = LIMITS.attribution_verify  # of which the true ablation effect is measured
    max_n_top: int = LIMITS.max_n_top
    max_verify: int = LIMITS.max_verify
    max_temperature: float = LIMITS.max_temperature
    max_seed: int = LIMITS.max_seed
    max_logprobs: int = LIMITS.max_logprobs  # most likely tokens per generated token
    max_top_logits: int = LIMITS.max_top_logits  # top next tokens of a graph intervention (POST /graph/intervene)
    default_top_logits: int = LIMITS.default_top_logits
    max_patch_features: int = LIMITS.max_patch_features  # activation patching: heatmap columns
    patch_features: int = LIMITS.patch_features
    max_chat_turns: int = LIMITS.max_chat_turns  # messages of one steered conversation
    max_message_chars: int = LIMITS.max_message_chars
    max_token_text_chars: int = 80  # a token given as text (patching's target and other)
    default_logprobs: int = LIMITS.default_logprobs
    secret_env: str = "SAESCOPE_WORKER_SECRET"  # the shared secret the worker requires, when set
    # explanations (POST /explain, /v1/chat/completions)
    explain_max_tokens: int = 60  # answer budget of the explainer for the feature page's button
    max_explain_examples: int = 64  # examples (top, per group, non-activating) a request may carry
    explain_timeout_s: float = 120.0  # an explanation request may take this long (a CPU model is slow)
    chat_max_tokens: int = LIMITS.max_chat_tokens  # largest max_tokens of the OpenAI-compatible chat route
    # contrast of two small sets of texts (POST /contrast) and search across SAEs (POST /search_all)
    max_contrast_texts: int = LIMITS.max_contrast_texts  # texts per side
    max_contrast_tokens: int = LIMITS.max_contrast_tokens  # tokens per text (BOS included)
    max_contrast_chars: int = LIMITS.max_contrast_chars  # characters per text
    max_contrast_top: int = LIMITS.max_contrast_top  # features listed per side
    contrast_top: int = LIMITS.contrast_top
    contrast_timeout_s: float = 120.0  # one live contrast may take this long (2 x 32 texts on a CPU: seconds)
    max_search_positions: int = LIMITS.max_search_positions
    max_search_top: int = LIMITS.max_search_top
    max_search_saes: int = 256  # SAEs one search may name
    search_top: int = LIMITS.search_top


@dataclass(frozen=True)
class MapSettings:
    """The feature map page's limits and defaults."""

    min_zoom: float = 1.0  # zoom 1 shows the whole map
    max_zoom: float = 64.0
    neighbourhood_k: int = 30  # nearest features drawn on a feature page, itself not counted
    svg_w: int = 320  # the neighbourhood SVG's viewBox
    svg_h: int = 200
    levels: int = 255  # colour codes 1..255; 0 = no value (a dead feature when colouring by density)


@dataclass(frozen=True)
class GraphPageSettings:
    """The attribution graph page's URL limits (the graph's own bounds: CIRCUIT in precompute/config.py)."""

    max_prompt_chars: int = 2000
    max_target_chars: int = 200  # a one-token target, with room for odd tokenisations
    max_ids: int = 200  # pinned node ids / supernode members a URL may carry
    max_id_chars: int = 80
    max_list_chars: int = 20_000  # the pinned= and groups= parameters
    max_groups: int = 50
    max_label_chars: int = 60
    worker_grace_s: float = 30.0  # the worker answers 504 this long after CIRCUIT.max_seconds
    client_grace_s: float = 60.0  # the dashboard waits this long after CIRCUIT.max_seconds
    cache_graphs: int = 8  # the worker keeps this many unpruned graphs (LRU): a reload or new thresholds rebuild nothing
    cache_mb: int = 1024  # ... and at most this much memory of their matrices (an N x N adjacency each)
    cache_variants: int = 8  # prunings (thresholds, checks on/off) kept per cached graph
    max_upload_mb: int = 20  # a circuit-tracer JSON file uploaded on /graph
    uploads_kept: int = 16  # uploaded graphs the dashboard keeps in memory (LRU) so their URLs survive a reload
    max_slug_chars: int = 80


SERVE = ServeSettings()
WORKER = WorkerSettings()
MAP = MapSettings()
GRAPH = GraphPageSettings()
VERSION = __version__
