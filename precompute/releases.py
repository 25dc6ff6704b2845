"""`--sae RELEASE/SAE_ID`: SAELens's published registry of pretrained SAEs, resolved to files saescope reads.

The registry is `sae_lens/pretrained_saes.yaml` (release -> repo_id, model, conversion_func, saes[id, path,
neuronpedia, norm_scaling_factor, ...], config_overrides). It is read from an installed `sae_lens` when
one is present (without importing it, which would pull in TransformerLens) and PyYAML is available;
otherwise from the trimmed copy vendored in `precompute/data/saelens_releases.json.gz` (see VENDORED_FROM;
regenerate with `python -m precompute.releases vendor path/to/pretrained_saes.yaml`).

Only what saescope can load is kept in full: releases whose files are SAELens folders (conversion_func
absent or "sae_lens"), Gemma Scope `params.npz` folders (conversion_func "gemma_2") and sparsify folders.
Other releases are kept by name, repo, model and conversion so that asking for one says why it cannot be
used instead of "unknown release".
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .config import PACKAGE_DATA
from .errors import NotFound, UserError

log = logging.getLogger(__name__)

VENDORED = PACKAGE_DATA / "saelens_releases.json.gz"
VENDORED_FROM = "sae-lens 6.54.12"  # the wheel whose pretrained_saes.yaml the vendored copy was trimmed from

# SAELens conversion_func -> saescope reader (precompute.saes.formats); None means SAELens's own folder format
READERS = {None: "saelens", "sae_lens": "saelens", "gemma_2": "gemmascope", "sparsify": "sparsify"}


class ReleaseError(UserError):
    """A release reference that cannot be resolved; the message says what is valid."""


@dataclass(frozen=True)
class ResolvedSAE:
    """Where one registry entry lives and how to read it."""

    release: str
    sae_id: str
    repo_id: str  # Hugging Face repo, e.g. google/gemma-scope-2b-pt-res
    path: str  # folder within the repo ("" = repo root)
    conversion: str  # SAELens conversion_func ("sae_lens" when absent)
    reader: str  # saescope reader: saelens | gemmascope | sparsify
    model: str  # model name as the registry gives it (TransformerLens-style for older releases)
    hook_name: str | None  # hook to pass to load_sae; None when the SAE's own cfg.json names it
    neuronpedia_id: str | None
    norm_scaling_factor: float | None  # activations are multiplied by this before encoding (SAELens folds it)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # normalisation and provenance hints, in words

    @property
    def hub_ref(self) -> str:
        """'owner/repo/folder', the hub reference precompute.saes.load_sae understands."""
        return f"{self.repo_id}/{self.path}".rstrip("/")

    def download_command(self, local_dir: str = "saes") -> str:
        include = f' --include "{self.path}/*"' if self.path else ""
        return f"hf download {self.repo_id}{include} --local-dir {local_dir}/{self.repo_id.replace('/', '__')}"

    def local_folder(self, local_dir: str = "saes") -> str:
        return f"{local_dir}/{self.repo_id.replace('/', '__')}/{self.path}".rstrip("/")


# ---------------------------------------------------------------- the registry
def trim_registry(raw: dict[str, Any]) -> dict[str, Any]:
    """pretrained_saes.yaml as a dict -> the compact form used here (and vendored)."""
    out: dict[str, Any] = {}
    for name, rel in raw.items():
        conv = rel.get("conversion_func")
        entry: dict[str, Any] = {"repo_id": rel["repo_id"], "model": rel.get("model"), "conversion": conv or "sae_lens"}
        if rel.get("config_overrides"):
            entry["config_overrides"] = rel["config_overrides"]
        saes = rel.get("saes") or []
        if conv in READERS:
            rows = []
            for s in saes:
                sid, path = str(s["id"]), str(s["path"])
                row = [sid, None if path == sid else path, s.get("neuronpedia"), s.get("norm_scaling_factor")]
                while len(row) > 1 and row[-1] is None:
                    row.pop()
                rows.append(row)
            entry["saes"] = rows
        else:
            entry["n_saes"] = len(saes)
        out[name] = entry
    return out


def _installed_yaml() -> Path | None:
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    return path if path.exists() else None


@lru_cache(maxsize=1)
def load_registry(prefer_installed: bool = True) -> tuple[dict[str, Any], str]:
    """(releases, source): from an installed sae_lens if possible, else the vendored copy."""
    yml = _installed_yaml() if prefer_installed else None
    if yml is not None:
        try:
            import yaml

            loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
            with open(yml) as f:
                return trim_registry(yaml.load(f, Loader=loader)), f"installed sae_lens ({yml})"
        except ImportError:
            log.info("sae_lens is installed but PyYAML is not; using the vendored registry")
        except Exception as err:  # a broken install should not stop a run: the vendored copy works
            log.warning("could not read %s (%s); using the vendored registry", yml, err)
    with gzip.open(VENDORED, "rt", encoding="utf-8") as f:
        data = json.load(f)
    return data["releases"], f"vendored copy from {data['source']}"


def _close(word: str, choices: list[str], n: int = 5) -> list[str]:
    sub = [c for c in choices if word.lower() in c.lower()]
    fuzzy = difflib.get_close_matches(word, choices, n=n, cutoff=0.6)
    return list(dict.fromkeys(fuzzy + sub))[:n]


def _listing(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"{shown}, … ({len(items)} in all)" if len(items) > n else shown


# ---------------------------------------------------------------- resolution
def split_ref(ref: str) -> tuple[str, str]:
    """'RELEASE/SAE_ID' -> (release, sae_id). SAE ids may contain '/', release names never do."""
    ref = ref.removeprefix("saelens:").strip().strip("/")
    release, _, sae_id = ref.partition("/")
    return release, sae_id


def is_release_ref(ref: str) -> bool:
    """True when the first component of `ref` is a release name in the registry."""
    return split_ref(str(ref))[0] in load_registry()[0]


def looks_like_release(ref: str) -> bool:
    """True for a known release, or a near miss of one (so a typo gets the release error, not a hub 404)."""
    release = split_ref(str(ref))[0]
    releases = load_registry()[0]
    return release in releases or bool(difflib.get_close_matches(release, list(releases), n=1, cutoff=0.85))


def _gemma2_hook(repo_id: str, path: str) -> tuple[str | None, str | None]:
    """The hook SAELens assigns a Gemma Scope SAE (from the repo name), or (None, why saescope cannot read it)."""
    m = re.search(r"layer_(\d+)", path)
    if "embedding" in path:
        return None, "an embedding SAE (hook_embed, with weights rescaled by sqrt(d_in)); saescope hooks layers only"
    if m is None:
        return None, f"no layer in the path {path!r}"
    layer = int(m.group(1))
    if "res" in repo_id:
        return f"blocks.{layer}.hook_resid_post", None
    if "mlp" in repo_id:
        return f"blocks.{layer}.hook_mlp_out", None
    if "att" in repo_id:
        return None, "an attention-output SAE on hook_z (per-head z); saescope does not hook hook_z"
    return None, f"no hook kind (res/mlp/att) in the repo name {repo_id!r}"


def _notes(rel: dict[str, Any], nsf: float | None) -> tuple[str, ...]:
    notes = []
    ov = rel.get("config_overrides") or {}
    if nsf is not None:
        notes.append(f"normalize_activations 'expected_average_only_in' with norm_scaling_factor={nsf}: "
                     "fold it into the weights at load (SAELens does)")
    if "normalize_activations" in ov:
        notes.append(f"the registry overrides normalize_activations to {ov['normalize_activations']!r}")
    if (ov.get("model_from_pretrained_kwargs") or {}).get("center_writing_weights"):
        notes.append("trained on TransformerLens activations with center_writing_weights=True: the residual "
                     "stream was centred over d_model (subtract each token's mean over d_model before encoding)")
    if "dataset_path" in ov:
        notes.append(f"trained on {ov['dataset_path']}")
    return tuple(notes)


def resolve_release(ref: str) -> ResolvedSAE:
    """'RELEASE/SAE_ID' -> ResolvedSAE; ReleaseError naming the valid choices otherwise."""
    releases, source = load_registry()
    release, sae_id = split_ref(str(ref))
    if release not in releases:
        close = _close(release, sorted(releases))
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ReleaseError(f"unknown SAELens release {release!r} ({len(releases)} releases in the {source}){hint}. "
                           "Use --sae RELEASE/SAE_ID with a release from SAELens's pretrained_saes.yaml")
    rel = releases[release]
    conv = rel["conversion"]
    if "saes" not in rel:
        raise ReleaseError(f"release {release!r} ({rel['repo_id']}) uses SAELens conversion {conv!r}, which saescope "
                           f"does not read; readable conversions: {', '.join(sorted({c or 'sae_lens' for c in READERS}))}")
    ids = [row[0] for row in rel["saes"]]
    if not sae_id:
        raise ReleaseError(f"release {release!r} needs an SAE id: --sae {release}/SAE_ID; valid: {_listing(ids)}")
    if sae_id not in ids:
        close = _close(sae_id, ids)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ReleaseError(f"unknown SAE id {sae_id!r} in release {release!r}{hint}; valid: {_listing(ids)}")
    row = rel["saes"][ids.index(sae_id)] + [None] * 3
    path = row[1] if row[1] is not None else sae_id
    hook = None
    if conv == "gemma_2":
        hook, why = _gemma2_hook(rel["repo_id"], path)
        if hook is None:
            raise ReleaseError(f"{release}/{sae_id} is {why}")
    nsf = row[3]
    return ResolvedSAE(release=release, sae_id=sae_id, repo_id=rel["repo_id"], path=path, conversion=conv,
                       reader=READERS[conv], model=rel.get("model") or "",
                       hook_name=hook, neuronpedia_id=row[2], norm_scaling_factor=nsf,
                       config_overrides=dict(rel.get("config_overrides") or {}), notes=_notes(rel, nsf))


def offline_message(res: ResolvedSAE, err: BaseException | None = None) -> str:
    what = f" ({type(err).__name__})" if err is not None else ""
    return (f"SAELens release {res.release!r}, SAE {res.sae_id!r}: could not fetch {res.path or '(repo root)'} from "
            f"the Hugging Face repo {res.repo_id}{what}; no network here? Download it where there is one:\n"
            f"  {res.download_command()}\n"
            f"then pass --sae {res.local_folder()}" + (f" --hook {res.hook_name}" if res.hook_name else ""))


def fetch_release(res: ResolvedSAE) -> Path:
    """Download (or find in the HF cache) the SAE's folder; FileNotFoundError with the download recipe offline."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(res.repo_id, allow_patterns=[f"{res.path}/*"] if res.path else None))
    except Exception as err:  # offline, gated, missing: all end in the same recipe
        raise NotFound(offline_message(res, err)) from err
    folder = root / res.path if res.path else root
    if not folder.exists():
        raise NotFound(offline_message(res))
    return folder


# ---------------------------------------------------------------- maintenance
def vendor(yaml_path: str, out: Path = VENDORED, source: str = VENDORED_FROM) -> None:
    """Write the trimmed registry from a pretrained_saes.yaml (needs PyYAML once, at maintenance time)."""
    import yaml

    with open(yaml_path) as f:
        raw = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    data = {"source": f"{source} (sae_lens/pretrained_saes.yaml)", "releases": trim_registry(raw)}
    # mtime=0 keeps the .gz byte-identical across rebuilds
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(data, separators=(",", ":"), sort_keys=True).encode())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "vendor":
        vendor(sys.argv[2])
    else:
        sys.exit("usage: python -m precompute.releases vendor path/to/pretrained_saes.yaml")
