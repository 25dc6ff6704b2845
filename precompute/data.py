"""Text sources and fixed-length token contexts.

Sources: 'default' (the offline demo corpus: CPython's own documentation text), a local .txt / .jsonl /
.parquet file, a local Hugging Face `datasets` folder (`save_to_disk`) or folder of data files (through
`load_dataset`), or a hub dataset id (streamed; needs a network).
Text is cut from the concatenated token stream, documents separated by EOS; with BOS handling on, every
context starts with the BOS token followed by context_len - 1 text tokens.
Pre-tokenized data (a column `input_ids` or `tokens` of token-id lists, the layout SAELens and Neuronpedia use)
is read as-is: one row is one context, never re-tokenized (see `iter_token_contexts`).
"""

from __future__ import annotations

import ast
import json
import logging
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .config import DEFAULT, cache_dir
from .errors import NotFound, UserError

log = logging.getLogger(__name__)

DEMO_CORPUS_LICENCE = (
    "Python Software Foundation License 2 (the CPython documentation topics in pydoc_data and the "
    "docstrings of the standard library's Python modules, read from this machine's CPython "
    f"{sys.version.split()[0]})"
)


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3") or p.startswith("_") for p in rel[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield doc


def demo_corpus() -> Path:
    """Build (once) and return the demo corpus as JSONL in the cache."""
    out = cache_dir() / f"demo_corpus_py{sys.version_info.major}{sys.version_info.minor}.jsonl"
    if out.exists():
        return out
    from pydoc_data.topics import topics

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    n = 0
    with tmp.open("w") as f:
        # interleave the two sources so any prefix of the corpus holds both prose and API text
        docs = list(_stdlib_docstrings())
        topic_docs = [topics[k] for k in sorted(topics)]
        stride = max(1, len(docs) // max(1, len(topic_docs)))
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
            if i % stride == 0 and topic_docs:
                f.write(json.dumps({"text": topic_docs.pop(0)}) + "\n")
                n += 1
        for doc in topic_docs:
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    tmp.rename(out)
    log.info("demo corpus: %d documents -> %s", n, out)
    return out


def iter_texts(dataset: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of a dataset, in a fixed order."""
    if dataset == DEFAULT:
        dataset = str(demo_corpus())
    path = Path(dataset)
    if path.is_dir():
        for row in _hf_dataset(path, split):
            if text_field not in row:
                raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(row)}); set --text-field")
            yield str(row[text_field])
        return
    if path.exists():
        if path.suffix == ".txt":
            text = path.read_text(encoding="utf-8", errors="replace")
            for para in text.split("\n\n\n"):
                if para.strip():
                    yield para
        elif path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if text_field not in row:
                        raise UserError(f"{path}:{i + 1}: no field {text_field!r} (fields: {', '.join(row)}); set --text-field")
                    yield str(row[text_field])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if text_field not in pf.schema_arrow.names:
                raise UserError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); set --text-field")
            for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
                yield from (str(t) for t in batch.column(0).to_pylist())
        else:
            raise UserError(f"dataset file {path} has suffix {path.suffix!r}; valid: .txt, .jsonl, .parquet")
        return
    if dataset.startswith((".", "/", "~")):
        raise NotFound(f"dataset file {dataset!r} does not exist")
    try:
        import datasets  # type: ignore
    except ImportError as err:
        raise UserError(
            f"dataset {dataset!r} is not a local file; to stream a Hugging Face dataset, pip install datasets "
            "(and have network). Offline, pass a local .txt/.jsonl/.parquet file or 'default'."
        ) from err
    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
        for row in ds:
            yield str(row[text_field])
    except Exception as err:
        raise UserError(f"could not stream dataset {dataset!r} from the hub ({type(err).__name__}: {err}); "
                         "no network? pass a local .txt/.jsonl/.parquet file") from err


TOKEN_COLUMNS = ("input_ids", "tokens")  # pre-tokenized layouts (SAELens, Neuronpedia), in order of preference


def _hf_dataset(path: Path, split: str):
    """A local datasets folder: save_to_disk output (load_from_disk) or a folder of data files (load_dataset)."""
    try:
        import datasets  # type: ignore
    except ImportError as err:
        raise UserError(f"{path} is a folder; reading it as a Hugging Face dataset needs `pip install datasets`") from err
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(str(path), split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path} has splits {', '.join(ds)}; no {split!r}")
        ds = ds[split]
    return ds


def token_column(dataset: str, text_field: str = "text") -> str | None:
    """The column of token ids to read as-is, when the dataset is pre-tokenized and has no text column asked for."""
    if dataset == DEFAULT:
        return None
    path = Path(dataset)
    names: list[str] = []
    if path.is_dir():
        names = list(_hf_dataset(path, "train").column_names)
    elif path.suffix in (".jsonl", ".json") and path.exists():
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        names = list(json.loads(first))
    elif path.suffix == ".parquet" and path.exists():
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
    if text_field in names:
        return None
    return next((c for c in TOKEN_COLUMNS if c in names), None)


def iter_token_rows(dataset: str, column: str, split: str = "train") -> Iterator[list[int]]:
    """Rows of token ids from a pre-tokenized .jsonl/.parquet file or datasets folder."""
    path = Path(dataset)
    if path.is_dir():
        for row in _hf_dataset(path, split):
            yield list(row[column])
    elif path.suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if column not in row:
                        raise UserError(f"{path}:{i + 1}: no field {column!r}; every row needs its token ids")
                    yield list(row[column])
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=1024):
            yield from (list(r) for r in batch.column(0).to_pylist())


def iter_token_contexts(rows: Iterator[list[int]], tokenizer, context_len: int, prepend_bos: bool,
                        source: str = "dataset") -> Iterator[np.ndarray]:
    """Pre-tokenized contexts, kept exactly as given: row i is context i (its first context_len tokens).

    BOS follows the SAE's config: with prepend_bos on, a row that does not start with BOS gets one (and loses its
    last token); with it off, rows are used unchanged. A row shorter than context_len is refused."""
    bos = bos_id(tokenizer) if prepend_bos else None
    vocab = len(tokenizer)
    told = False
    for i, row in enumerate(rows):
        if bos is not None and (not row or row[0] != bos):
            row = [bos] + list(row)
        if len(row) < context_len:
            raise UserError(f"{source}: row {i} has {len(row)} tokens; every row must hold at least --context-len "
                             f"{context_len} (BOS included{'' if bos is None else ', added when missing'}); "
                             "lower --context-len to the rows' length")
        if len(row) > context_len and not told:
            log.warning("%s: rows hold %d tokens; each context uses its first %d (--context-len)", source, len(row),
                        context_len)
            told = True
        ctx = np.asarray(row[:context_len], dtype=np.int64)
        if ctx.min() < 0 or ctx.max() >= vocab:
            raise UserError(f"{source}: row {i} holds token id {int(ctx.max() if ctx.max() >= vocab else ctx.min())}, "
                             f"outside the tokenizer's vocabulary 0..{vocab - 1}: tokenized for another model?")
        yield ctx.astype(np.int32)


def iter_dataset_contexts(dataset: str, text_field: str, tokenizer, context_len: int,
                          prepend_bos: bool) -> Iterator[np.ndarray]:
    """Contexts of any source: pre-tokenized rows as-is when the dataset has a token column (and not the text
    field), otherwise text tokenized and cut into contexts."""
    column = token_column(dataset, text_field)
    if column is not None:
        log.info("%s is pre-tokenized (column %r): contexts are read as-is, never re-tokenized", dataset, column)
        return iter_token_contexts(iter_token_rows(dataset, column), tokenizer, context_len, prepend_bos, dataset)
    return iter_contexts(iter_texts(dataset, text_field), tokenizer, context_len, prepend_bos)


def bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def iter_contexts(texts: Iterator[str], tokenizer, context_len: int, prepend_bos: bool) -> Iterator[np.ndarray]:
    """Fixed-length int32 token contexts cut from the document stream."""
    bos = bos_id(tokenizer) if prepend_bos else None
    if prepend_bos and bos is None:
        raise UserError("prepend_bos is on but the tokenizer has neither a BOS nor an EOS token")
    body = context_len - (1 if bos is not None else 0)
    if body < 1:
        raise UserError(f"context length {context_len} is too short")
    sep = tokenizer.eos_token_id
    buf: list[int] = []
    for text in texts:
        for start in range(0, len(text), 200_000):  # keep single tokenizer calls bounded
            buf.extend(tokenizer(text[start:start + 200_000], add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            buf.append(sep)
        while len(buf) >= body:
            chunk, buf = buf[:body], buf[body:]
            yield np.asarray(([bos] if bos is not None else []) + chunk, dtype=np.int32)


def special_mask(tokens: np.ndarray, tokenizer) -> np.ndarray:
    """True where a token is special (BOS/EOS/pad/...): such positions never count as activations."""
    ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int32)
    return np.isin(tokens, ids)
