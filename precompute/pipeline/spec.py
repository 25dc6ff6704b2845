"""The run spec of `saescope precompute`: every setting of one run, each field with its help text.

`PrecomputeSpec` is what the Python API takes and what the CLI builds: the CLI's precompute flags are generated from
these fields (name, type, default, help; `setting(flag=..., choices=..., default_text=...)` refines one), so a new
setting is one field here. Defaults come from config.py (EMBEDDED, PRECOMPUTE); none is written here.
The SAEs of a run (`saes`) come from the repeated --sae/--hook/--sae-id flags, aligned by position, or a --run file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from ..config import EMBEDDED, PRECOMPUTE
from ..errors import UserError

E, P = EMBEDDED, PRECOMPUTE

# on_event(name, **info): the one observation point of a run (tests stop or pause a run from it; benchmarks
# collect timings). Events: "batch" (shard, batches, contexts) after a batch is committed; "range" (index, todo)
# before the one-process table builder builds a feature range; "finished" (load, stream, forward, publish,
# tokens: seconds and tokens) when the store is published. An exception it raises stops the run as a Ctrl-C would
# (KeyboardInterrupt keeps every committed batch and finished range).
EventHook = Callable[..., None]


def setting(default: Any = MISSING, help: str = "", *, flag: str | None = None, metavar: str | None = None,
            choices: tuple[str, ...] | None = None, default_text: str | None = None, cli: bool = True,
            default_factory: Any = MISSING) -> Any:
    """A spec field with its CLI metadata: help (the default is appended by the CLI), the flag name when it is not
    --field-name, a metavar, choices, what a None default means (default_text), or cli=False (no flag)."""
    md = {"help": help, "flag": flag, "metavar": metavar, "choices": choices, "default_text": default_text, "cli": cli}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass(frozen=True)
class SAESpec:
    """One SAE of a run: where it is, an optional hook override and its name inside the store."""

    path: str = setting(E.sae, "SAE folder/file (SAELens, sparsify, Gemma Scope params.npz, OpenAI .pt), a hub "
                        "reference owner/repo/folder, or 'default'; repeat for several SAEs in one pass",
                        flag="--sae", metavar="PATH", default_text="'default', the embedded demo SAE")
    hook: str | None = setting(None, "override the SAE's hook, e.g. blocks.9.hook_resid_post; once per --sae, in "
                               "the same order", default_text="the hook in the SAE's config")
    sae_id: str | None = setting(None, "name of the SAE inside the store, once per --sae",
                                 default_text="derived from model and hook")


RUN_FILE_KEYS = {"path", "hook", "id", "sae_id"}


def load_run_file(path: Path) -> list[SAESpec]:
    """SAEs listed in a TOML (`[[sae]]` tables) or JSON ({"sae": [...]} or a list) run file.

    Each entry: path (required), hook and id (optional)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--run {path}: no such file (a .toml with [[sae]] entries or a .json list)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"--run {path}: unknown suffix {path.suffix!r}; valid: .toml, .json")
    except (ValueError, json.JSONDecodeError) as err:  # tomllib.TOMLDecodeError is a ValueError
        if isinstance(err, UserError):
            raise
        raise UserError(f"--run {path} could not be parsed: {err}") from err
    entries = data if isinstance(data, list) else data.get("sae") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--run {path} lists no SAEs; write one [[sae]] table (TOML) or a list under \"sae\" "
                        "(JSON) per SAE, each with path = ... and optionally hook = ... and id = ...")
    specs = []
    for n, e in enumerate(entries, 1):
        if not isinstance(e, dict) or "path" not in e:
            raise UserError(f"--run {path}: SAE entry {n} needs a path (and optionally hook, id); got {e!r}")
        unknown = set(e) - RUN_FILE_KEYS
        if unknown:
            raise UserError(f"--run {path}: SAE entry {n} has unknown keys {sorted(unknown)}; valid: path, hook, id")
        specs.append(SAESpec(str(e["path"]), e.get("hook"), e.get("id", e.get("sae_id"))))
    return specs


def specs_from_cli(saes: list[str] | None, hooks: list[str] | None, ids: list[str] | None,
                   run_file: Path | None) -> list[SAESpec]:
    """Repeated --sae/--hook/--sae-id (aligned by position) or a --run file -> SAE specs."""
    if run_file is not None:
        if saes or hooks or ids:
            raise UserError("give the SAEs either with --run FILE or with --sae/--hook/--sae-id, not both")
        return load_run_file(run_file)
    saes = saes or [E.sae]
    for flag, vals in (("--hook", hooks), ("--sae-id", ids)):
        if vals and len(vals) != len(saes):
            raise UserError(f"{flag} was given {len(vals)} time(s) for {len(saes)} --sae; give it once per --sae, "
                            "in the same order, or not at all")
    return [SAESpec(p, hooks[i] if hooks else None, ids[i] if ids else None) for i, p in enumerate(saes)]


RUN_FLAG_HELP = "a .toml ([[sae]] path=..., hook=..., id=...) or .json list of the SAEs to precompute"


@dataclass
class PrecomputeSpec:
    """Everything one `saescope precompute` run does (the CLI's flags are these fields)."""

    out: Path = setting(help="DuckDB store; an existing store gains this run's SAEs")
    saes: list[SAESpec] = setting(help="the SAEs fed by one forward pass (--sae/--hook/--sae-id, or --run FILE)",
                                  default_factory=lambda: [SAESpec()])
    model: str = setting(E.model, "HF hub id or local folder of a causal LM, or 'default'",
                         default_text="'default', the embedded SmolLM2-135M-Instruct")
    device: str = setting(P.device, "cpu, cuda, cuda:1 or auto")
    dtype: str = setting(P.dtype, "model dtype: float32, bfloat16, float16 or auto = bfloat16 on CUDA, float32 on "
                         "CPU (SAESCOPE_CPU_BF16=auto: bfloat16 on CPUs with native bf16, avx512_bf16/amx_bf16, ~1.7x "
                         "faster; stored values then meet verify's bf16 bound, not fp32 equality)")
    dataset: str = setting(E.dataset, "'default', a .txt/.jsonl/.parquet file, or a HF dataset id",
                           default_text="'default', CPython's documentation text")
    text_field: str = setting(P.text_field, "text column of a .jsonl/.parquet/HF dataset")
    tokens: int = setting(P.tokens, "tokens to stream (rounded down to whole contexts)")
    context_len: int = setting(P.context_len, "tokens per context, BOS included")
    batch_size: int = setting(P.batch_size, "contexts per forward pass")
    prepend_bos: str = setting(P.prepend_bos, "start every context with BOS; auto follows the SAE config (SAELens "
                               "prepend_bos)", choices=("auto", "yes", "no"))
    top_k: int = setting(P.top_k, "top-activating examples kept per feature")
    n_intervals: int = setting(P.n_intervals, "equal-width activation intervals sampled")
    per_interval: int = setting(P.per_interval, "examples drawn per interval")
    n_quantiles: int = setting(P.n_quantiles, "equal-count (rank) quantiles sampled")
    per_quantile: int = setting(P.per_quantile, "examples drawn per quantile")
    hist_bins: int = setting(P.hist_bins, "bins of each feature's activation histogram")
    restart: bool = setting(False, "discard an unfinished run's checkpoint instead of resuming")
    memory_limit: str = setting(P.memory_limit, "memory limit of every DuckDB connection (table builder; a quarter "
                                "of it for the store being written); beyond it DuckDB spills to OUT.work/spill/")
    rows_per_range: int = setting(P.rows_per_range, "activations per feature range while building tables (smaller: "
                                  "less memory, more scans)")
    shards: int = setting(1, "split the contexts into N shards streamed as Ray tasks (one GPU each when the cluster "
                          "has GPUs); the tables are then built by Ray tasks over feature ranges. Needs pip install "
                          "'saescope[ray]'. The store equals the one-process result exactly; 1 runs in this process",
                          metavar="N")
    ray: str | None = setting(None, "Ray cluster to use with --shards, e.g. ray://head:10001 or auto",
                              metavar="ADDRESS", default_text="start a local Ray")
    verify_sample: int = setting(P.verify_sample, "contexts re-encoded in fp32 at the end to check the stored values "
                                 "(0: skip)")
    eval_tokens: int = setting(P.eval_tokens, "held-out tokens (after the streamed ones) for the SAE quality metrics, "
                               "SAELens/SAEBench definitions (precompute/quality.py; 0: skip)")
    feature_map: bool = setting(P.feature_map, "the 2-D feature map (a seeded UMAP of the decoder directions); "
                                "--no-map skips it", flag="--map")
    cooccurrence: bool = setting(P.cooccurrence, "co-occurring features (exact Jaccard over active token "
                                 "positions); --no-cooccurrence skips them")
    progress: bool = setting(True, "progress bars on stderr")
    on_event: EventHook | None = setting(None, "called as on_event(name, **info) (see EventHook); Python API only",
                                         cli=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.saes = list(self.saes)

    def event(self, name: str, **info: Any) -> None:
        if self.on_event is not None:
            self.on_event(name, **info)
