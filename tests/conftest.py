"""Session fixtures: tiny real models saved and reloaded with transformers, real SAE files, real stores.

Everything here is built once per test session (the embedded default is converted once per machine into
the saescope cache) so that the whole suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import start_process, stop_process, worker_cmd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# dtype "auto" means bfloat16 on CPUs with native bf16: the suite's brute-force checks hold float32 stores to 1e-6,
# so keep auto at float32 on every machine (tests/test_bf16.py builds its bf16 store with an explicit dtype)
os.environ.setdefault("SAESCOPE_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from saescope.precompute.embedded import convert_default_model

    return convert_default_model()


def _tiny_config(family: str):
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "gpt2":
        return GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=3, n_head=4)
    if family == "neox":
        return GPTNeoXConfig(vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if family == "gemma2":
        return Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            sliding_window=16)
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """family -> folder of a tiny random model saved with save_pretrained (weights only; no tokenizer)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_tiny_config(family))
            with torch.no_grad():  # random norms, so the gain folding and (1 + w) conventions are exercised
                for name, p in model.named_parameters():
                    if "norm" in name or "ln" in name:
                        p.add_(torch.randn_like(p) * 0.3)
            model.save_pretrained(root / family)
            made[family] = root / family
        return made[family]

    return get


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, default_model_dir) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer, saved and reloaded like any hub checkout."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tinylm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    """A random TopK SAE (d_in 64, 96 features, k 6) on the tiny Llama's blocks.1.hook_resid_post."""
    from saescope.precompute.saes import SAEConfig, save_saelens
    from saescope.precompute.saes.topk import TopKSAE

    torch.manual_seed(1)
    sae = TopKSAE(SAEConfig(architecture="topk", d_in=64, d_sae=96, k=6, hook_name="blocks.1.hook_resid_post",
                            model_name="tiny"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.b_dec.mul_(0.02)
        sae.W_enc.mul_(15.0)  # the tiny model's residual stream is small (~0.3 norm); make features input-driven
        sae.b_enc.mul_(0.3).sub_(0.6)  # some top-k pre-activations stay below zero: zeros are exercised too
    out = tmp_path_factory.mktemp("tinysae")
    save_saelens(sae, out)
    return out


@pytest.fixture(scope="session")
def second_sae_dir(tmp_path_factory) -> Path:
    """A random ReLU ('standard') SAE (64 -> 48) on the tiny Llama's blocks.2.hook_resid_pre."""
    from saescope.precompute.saes import SAEConfig, save_saelens
    from saescope.precompute.saes.standard import StandardSAE

    torch.manual_seed(7)
    sae = StandardSAE(SAEConfig(architecture="standard", d_in=64, d_sae=48, hook_name="blocks.2.hook_resid_pre",
                                model_name="tiny"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.W_enc.mul_(10.0)
        sae.b_enc.mul_(0.2).sub_(1.5)  # most pre-activations below zero: sparse
        sae.b_dec.mul_(0.02)
    out = tmp_path_factory.mktemp("second_sae")
    save_saelens(sae, out)
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few kilobytes of text as JSONL, taken from the demo corpus (offline, deterministic)."""
    from saescope.precompute.data import demo_corpus

    out = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    with demo_corpus().open() as f, out.open("w") as g:
        for i, line in enumerate(f):
            if i >= 60:
                break
            g.write(line)
    return out


def interrupt_after(event: str, **when):
    """An on_event callback that stops a precompute run as a Ctrl-C would, at the first `event` whose info reaches
    every value of `when` (e.g. interrupt_after("batch", batches=2): right after the second committed batch)."""

    def on_event(name: str, **info) -> None:
        if name == event and all(info[k] >= v for k, v in when.items()):
            raise KeyboardInterrupt

    return on_event


TINY_ARGS = dict(tokens=64 * 40, context_len=64, batch_size=8, top_k=5, n_intervals=4, per_interval=3,
                 n_quantiles=4, per_quantile=3, progress=False)
# TINY_ARGS' table sizes as `saescope precompute` flags (tokens, model, SAE and output left to the test)
TINY_CLI = ["--context-len", "64", "--batch-size", "8", "--top-k", "5", "--n-intervals", "4", "--per-interval", "3",
            "--n-quantiles", "4", "--per-quantile", "3", "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="session")
def make_store(tmp_path_factory, tiny_lm_dir, tiny_sae_dir, small_corpus):
    """make_store(**overrides) -> the path of a store built by run_precompute with the tiny model, the tiny TopK SAE
    (id "tiny"), the small corpus and TINY_ARGS, each overridden by a PrecomputeSpec field of `overrides`
    (saes=[SAESpec(...)], tokens=..., feature_map=False, ...). Built once per distinct overrides per session:
    treat the result as read-only (copy it to change it)."""
    from saescope.precompute.pipeline import PrecomputeSpec, SAESpec, run_precompute

    built: dict[str, Path] = {}

    def make(**overrides) -> Path:
        key = repr(sorted(overrides.items()))
        if key not in built:
            spec = {"model": str(tiny_lm_dir), "saes": [SAESpec(str(tiny_sae_dir), sae_id="tiny")],
                    "dataset": str(small_corpus), **TINY_ARGS, **overrides}
            out = tmp_path_factory.mktemp("store") / "store.duckdb"
            built[key] = run_precompute(PrecomputeSpec(out=out, **spec))
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_store(make_store) -> Path:
    return make_store()


@pytest.fixture(scope="session")
def two_sae_store(make_store, tiny_sae_dir, second_sae_dir) -> Path:
    """The tiny TopK SAE ("tiny", blocks.1.hook_resid_post) and the ReLU SAE ("relu", blocks.2.hook_resid_pre)
    precomputed in one run over the tiny store's tokens."""
    from saescope.precompute.pipeline import SAESpec

    return make_store(saes=[SAESpec(str(tiny_sae_dir), None, "tiny"), SAESpec(str(second_sae_dir), None, "relu")])


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory, default_model_dir) -> Path:
    """The embedded default (SmolLM2 + the committed demo SAE) over 16k tokens of the demo corpus, without the
    quality metrics (eval_tokens=0)."""
    from saescope.precompute.pipeline import PrecomputeSpec, run_precompute

    out = tmp_path_factory.mktemp("demostore") / "demo.duckdb"
    # no map here: tests of the map use the tiny store (same code path) and the demo SAE's real decoder rows.
    # No quality metrics either: 1,024 held-out tokens through the whole 30-layer model (with, without and with a
    # zero splice) cost a quarter of this build's CPU time (110.6 -> 81.7 s measured), and no test of this store
    # reads them; tests/test_quality.py checks them on its own stores, the tiny stores carry them
    run_precompute(PrecomputeSpec(out=out, tokens=16_384, progress=False, feature_map=False, eval_tokens=0))
    return out


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@contextlib.contextmanager
def serve_in_thread(app, start_timeout_s: float = 30.0):
    """A real uvicorn server for an ASGI app on a free loopback port, in a thread: yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + start_timeout_s
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, f"uvicorn did not start within {start_timeout_s} s"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


stop_group = stop_process  # the name tests/test_browser.py imports


# ------------------------------------------------------------------------------------------ shared live parts
@pytest.fixture(scope="session")
def tiny_worker(tiny_store) -> str:
    """One real `saescope worker` process on the tiny store (batching window 30 ms), shared by every test that
    only needs a worker: yields its base URL. Tests that need their own flags or kill it start their own."""
    port = free_port()
    proc = start_process(worker_cmd(tiny_store, port, "--batch-wait-ms", "30"), ready=f"http://127.0.0.1:{port}/health",
                         stdout=subprocess.DEVNULL)
    yield f"http://127.0.0.1:{port}"
    stop_process(proc, grace_s=0)


@pytest.fixture(scope="session")
def worker_client(tiny_lm_dir, tiny_sae_dir):
    """The worker app on the tiny model and SAE in this process (FastAPI's TestClient; no subprocess)."""
    from fastapi.testclient import TestClient

    from saescope.app.worker.engine import build_engine
    from saescope.app.worker.routes import create_worker_app

    engine = build_engine(str(tiny_lm_dir), {"tiny": str(tiny_sae_dir)}, {"tiny": None}, "cpu", "float32")
    with TestClient(create_worker_app(engine)) as client:
        yield client


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium (Debian's /usr/bin/chromium, driven by Playwright) for the session."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM) and os.environ.get("SAESCOPE_SKIP_BROWSER") == "1":
        pytest.skip("SAESCOPE_SKIP_BROWSER=1 and no /usr/bin/chromium")
    assert os.path.exists(CHROMIUM), "install Debian's chromium (make browser) for the browser tests"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def demo_sae():
    """The committed demo SAE (the embedded default's), loaded once."""
    from saescope.precompute.config import EMBEDDED
    from saescope.precompute.saes import load_sae

    return load_sae(EMBEDDED.sae_dir)


# fixtures that start a process, a server (in a subprocess or a uvicorn thread), a browser or Ray: a test using one
# is slow whether or not it says so
SLOW_FIXTURES = {"tiny_worker", "browser", "local_ray", "server", "served", "worker",  # processes, Ray, Chromium
                 "worker_url", "inproc", "gpt2_128"}  # uvicorn threads (test_explain_cli.py, test_worker.py)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("browser") or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
