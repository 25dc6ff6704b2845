"""The `saescope` command: precompute's flags are the spec's fields, --help reads well, only saescope's own errors
are exit-2 messages, secrets can stay off the command line, and a non-loopback dashboard warns."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import pytest

from saescope.app.cli import build_parser, main
from saescope.app.cli import precompute as precompute_cmd
from saescope.app.cli._common import read_secret, warn_if_exposed
from saescope.app.settings import WORKER
from saescope.precompute.errors import UserError
from saescope.precompute.pipeline import PrecomputeSpec, SAESpec
from saescope.precompute.store import Store
from tests.conftest import ROOT, TINY_CLI, free_port
from tests.helpers import start_process, stop_process, worker_cmd


def _sub(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help(name: str) -> str:
    """The --help text, unwrapped (argparse wraps at hyphens too, so a narrow terminal would split flag names)."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "10000"
    try:
        return _sub(name).format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


# ------------------------------------------------------------------ precompute flags = spec fields


def test_every_spec_field_has_a_flag_and_every_flag_a_field():
    p = _sub("precompute")
    dests = {a.dest for a in p._actions if a.option_strings and a.dest != "help"}
    cli_fields = {f.name for f in dataclasses.fields(PrecomputeSpec) if f.metadata.get("cli", True)}
    sae_fields = {f"saes.{f.name}" for f in dataclasses.fields(SAESpec)}
    assert {f.name for f in dataclasses.fields(PrecomputeSpec)} - cli_fields == {"on_event"}  # the Python-only hook
    mapped = {precompute_cmd.FIELD_OF[d] for d in dests}  # KeyError: a flag that fills no field
    assert mapped == (cli_fields - {"saes"}) | sae_fields | {"saes"}
    assert set(precompute_cmd.FIELD_OF) == dests


def _other_value(f: dataclasses.Field, tp):
    """A valid value of the field's type that differs from its default (and its CLI text)."""
    base = precompute_cmd._base(tp)
    if base is bool:
        return not f.default, []
    if f.metadata.get("choices"):
        v = next(c for c in f.metadata["choices"] if c != f.default)
        return v, [v]
    if base is int:
        v = (f.default if isinstance(f.default, int) else 0) + 3
        return v, [str(v)]
    if base is Path:
        return Path("elsewhere.duckdb"), ["elsewhere.duckdb"]
    return f"x-{f.name}", [f"x-{f.name}"]


def test_every_flag_reaches_the_spec():
    """Each flag set to a non-default value changes exactly its field: no flag is dropped on the way."""
    hints = typing.get_type_hints(PrecomputeSpec)
    flag_of = {a.dest: a for a in _sub("precompute")._actions if a.option_strings}
    base = ["precompute", "--out", "x.duckdb"]
    default = precompute_cmd.spec_from_args(build_parser().parse_args(base))
    assert default.saes == [SAESpec()] and default.out == Path("x.duckdb")
    for f in dataclasses.fields(PrecomputeSpec):
        if not f.metadata.get("cli", True) or f.name in ("saes", "out"):
            continue
        value, text = _other_value(f, hints[f.name])
        action = flag_of[f.name]
        if isinstance(action, argparse.BooleanOptionalAction):
            flag = action.option_strings[0] if value else action.option_strings[1]
        else:
            flag = action.option_strings[0]
        got = precompute_cmd.spec_from_args(build_parser().parse_args(base + [flag, *text]))
        assert getattr(got, f.name) == value, f.name
        others = {g.name for g in dataclasses.fields(PrecomputeSpec)
                  if g.name not in ("on_event", f.name) and getattr(got, g.name) != getattr(default, g.name)}
        assert not others, f"{flag} also changed {others}"
    got = precompute_cmd.spec_from_args(build_parser().parse_args(
        ["precompute", "--out", "elsewhere", "--sae", "s", "--hook", "h", "--sae-id", "i"]))
    assert got.out == Path("elsewhere") and got.saes == [SAESpec("s", "h", "i")]


def test_precompute_help_states_each_default_once_and_meaningfully():
    text = _help("precompute")
    # one help entry per option: "  --flag ... help" blocks
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(blocks) > 25
    for b in blocks:
        b = " ".join(b.split())
        assert b.count("(default") <= 1, b
        assert "(default: None)" not in b and "(default: default)" not in b and "(default: False)" not in b, b
        assert "(default: True)" not in b, b
    flat = " ".join(text.split())
    assert "--map, --no-map" in flat and "--no-map skips it (default: on)" in flat
    assert "--cooccurrence, --no-cooccurrence" in flat
    assert "--sae-id SAE_ID name of the SAE inside the store, once per --sae (default: derived from model and hook)" in flat
    assert "(default: 'default', the embedded demo SAE)" in flat
    assert re.search(r"--restart discard an unfinished run's checkpoint instead of resuming --", flat), \
        "an off switch has no default"
    assert "--tokens TOKENS tokens to stream (rounded down to whole contexts) (default: 262144)" in flat
    assert "--ray ADDRESS Ray cluster to use with --shards, e.g. ray://head:10001 or auto (default: start a local Ray)" in flat


@pytest.mark.parametrize("cmd", ["serve", "worker", "verify", "export", "explain", "train-sae", "import-explanations",
                                 "demo"])
def test_other_helps_print_no_empty_defaults(cmd):
    for b in re.split(r"\n  (?=-)", _help(cmd).split("options:", 1)[1]):
        b = " ".join(b.split())
        assert b.count("(default") <= 1 and "(default: None)" not in b and "(default: False)" not in b, b


@pytest.mark.slow  # a subprocess
def test_precompute_help_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "saescope.app.cli", "precompute", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--map, --no-map" in r.stdout and "(default: None)" not in r.stdout


# ------------------------------------------------------------------ errors: ours exit 2, bugs keep their traceback


def test_a_user_error_is_a_message_and_exit_2(capsys):
    code = main(["precompute", "--out", "x.duckdb", "--sae", "a", "--hook", "h1", "--hook", "h2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --hook was given 2 time(s) for 1 --sae") and "Traceback" not in err


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A RuntimeError that is not saescope's own (a bug) propagates from main() instead of becoming exit 2."""
    from saescope.app.cli import verify

    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(verify, "run", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["verify", "nowhere.duckdb"])


@pytest.mark.slow
def test_a_bug_in_a_subprocess_exits_with_a_traceback(tmp_path):
    code = ("import sys; import saescope.app.cli.verify as v; v.run = lambda args: 1 / 0; "
            "from saescope.app.cli import main; sys.exit(main(['verify', 'nowhere.duckdb']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode not in (0, 2)
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


def test_a_missing_dataset_file_is_a_user_error(tmp_path, tiny_lm_dir, tiny_sae_dir, capsys):
    """A readable FileNotFoundError of ours (NotFound) is still a one-line message and exit 2."""
    code = main(["precompute", "--out", str(tmp_path / "x.duckdb"), "--model", str(tiny_lm_dir), "--sae",
                 str(tiny_sae_dir), "--dataset", str(tmp_path / "missing.txt"), "--tokens", "128", "--context-len", "64",
                 "--no-progress", "--no-map", "--verify-sample", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.txt' does not exist" in err and "Traceback" not in err


# ------------------------------------------------------------------ secrets and exposure


def test_secret_from_a_file_or_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_text("s3cret-value\n")
    monkeypatch.delenv(WORKER.secret_env, raising=False)
    assert read_secret(None, f, "secret") == "s3cret-value"
    assert read_secret("given", None, "secret") == "given"
    assert read_secret(None, None, "secret") is None
    monkeypatch.setenv(WORKER.secret_env, "from-env")
    assert read_secret(None, None, "secret") == "from-env"
    assert read_secret(None, f, "secret") == "s3cret-value"  # the file wins over the environment
    with pytest.raises(UserError, match="not both"):
        read_secret("given", f, "secret")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        read_secret(None, tmp_path / "empty", "worker-secret")
    with pytest.raises(UserError, match="cannot read it"):
        read_secret(None, tmp_path / "missing", "worker-secret")


def test_help_prefers_the_secret_file():
    for cmd, flag in (("worker", "--secret"), ("serve", "--worker-secret")):
        flat = " ".join(_help(cmd).split())
        assert f"{flag}-file PATH" in flat
        assert f"visible to every user of this machine in `ps`, so prefer {flag}-file or ${WORKER.secret_env}" in flat


def test_loopback_does_not_warn(capsys):
    assert not warn_if_exposed("127.0.0.1", "x") and not warn_if_exposed("::1", "x")
    assert warn_if_exposed("0.0.0.0", "exposed") and capsys.readouterr().err == "warning: exposed\n"


@pytest.mark.slow
def test_worker_takes_its_secret_from_a_file(tiny_store, tmp_path):
    secret = tmp_path / "worker.secret"
    secret.write_text("file-secret\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != WORKER.secret_env}
    url = f"http://127.0.0.1:{port}/health"
    # start_process fails with the worker's stderr if it exits, or does not answer within 120 s
    proc = start_process(worker_cmd(tiny_store, port, "--secret-file", str(secret)), ready=url,
                         headers={"Authorization": "Bearer file-secret"}, stdout=subprocess.DEVNULL, env=env)
    try:
        assert httpx.get(url, headers={"Authorization": "Bearer file-secret"}).status_code == 200
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        stop_process(proc, grace_s=0)


@pytest.mark.slow
def test_serve_on_a_non_loopback_host_warns(tiny_store):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "saescope.app.cli", "serve", str(tiny_store), "--host", "0.0.0.0",
                             "--port", str(port), "--no-worker", "--no-prewarm"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = ""
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            seen += line
            if "is serving" in line or not line:
                break
        assert "is serving" in seen, seen[-2000:]
        warning = " ".join(seen.split("warning: ", 1)[1].split("saescope is serving")[0].split())
        assert warning.startswith("the dashboard listens on 0.0.0.0, beyond this machine, without authentication")
        assert "steering and explanations" in warning and "reverse proxy" in warning
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).status_code == 200
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- paths and SAE lists
def test_relative_model_and_sae_paths_are_stored_absolute(tmp_path, monkeypatch, capsys, tiny_lm_dir, tiny_sae_dir,
                                                            small_corpus):
    """Before: `--model models/lm` was stored as the string 'models/lm', so a worker started from any other
    directory could not find the model. (`saescope precompute` runs in this process, from another directory.)"""
    from saescope.app.cli import main

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lm").symlink_to(tiny_lm_dir, target_is_directory=True)
    (tmp_path / "saes").mkdir()
    (tmp_path / "saes" / "s").symlink_to(tiny_sae_dir, target_is_directory=True)
    shutil.copy(small_corpus, tmp_path / "c.jsonl")
    monkeypatch.chdir(tmp_path)
    code = main(["precompute", "--model", "models/lm", "--sae", "saes/s", "--dataset", "c.jsonl", "--tokens",
                 str(64 * 8), "--out", "s.duckdb", "--sae-id", "rel", *TINY_CLI])
    assert code == 0, capsys.readouterr().err[-2000:]
    monkeypatch.chdir(ROOT)
    with Store(tmp_path / "s.duckdb") as store:
        info = store.sae("rel")
    for stored, real in ((info.model_path, tiny_lm_dir), (info.sae_path, tiny_sae_dir)):
        assert os.path.isabs(stored), f"stored as typed: {stored!r}"
        assert Path(stored).resolve() == Path(real).resolve()


def test_run_file_and_repeated_flags(tmp_path, tiny_sae_dir, second_sae_dir):
    from saescope.app.cli import build_parser
    from saescope.app.cli.precompute import spec_from_args
    from saescope.precompute.pipeline import SAESpec

    toml = tmp_path / "run.toml"
    toml.write_text(f'[[sae]]\npath = "{tiny_sae_dir}"\nid = "a"\n\n[[sae]]\npath = "{second_sae_dir}"\n'
                    'hook = "blocks.2.hook_resid_post"\nid = "b"\n')
    want = [SAESpec(str(tiny_sae_dir), None, "a"), SAESpec(str(second_sae_dir), "blocks.2.hook_resid_post", "b")]
    p = build_parser()
    a = spec_from_args(p.parse_args(["precompute", "--out", "x.duckdb", "--run", str(toml)]))
    assert a.saes == want
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"sae": [{"path": str(tiny_sae_dir), "id": "a"},
                                      {"path": str(second_sae_dir), "hook": "blocks.2.hook_resid_post", "id": "b"}]}))
    assert spec_from_args(p.parse_args(["precompute", "--out", "x", "--run", str(js)])).saes == want
    flags = ["precompute", "--out", "x", "--sae", str(tiny_sae_dir), "--sae", str(second_sae_dir),
             "--hook", "blocks.1.hook_resid_post", "--hook", "blocks.2.hook_resid_post", "--sae-id", "a", "--sae-id", "b"]
    got = spec_from_args(p.parse_args(flags)).saes
    assert got == [SAESpec(str(tiny_sae_dir), "blocks.1.hook_resid_post", "a"), want[1]]
    # one SAE, as before
    one = spec_from_args(p.parse_args(["precompute", "--out", "x", "--sae-id", "z"])).saes
    assert one == [SAESpec("default", None, "z")]


@pytest.mark.parametrize("argv, match", [
    (["--sae", "a", "--sae", "b", "--hook", "blocks.1.hook_resid_post"], "--hook was given 1 time"),
    (["--sae", "a", "--sae-id", "x", "--sae-id", "y"], "--sae-id was given 2 time"),
    (["--sae", "a", "--run", "r.toml"], "either with --run"),
    (["--run", "nope.toml"], "no such file"),
])
def test_bad_sae_lists_are_refused_readably(argv, match):
    from saescope.app.cli import build_parser
    from saescope.app.cli.precompute import spec_from_args

    with pytest.raises(ValueError, match=match):
        spec_from_args(build_parser().parse_args(["precompute", "--out", "x", *argv]))

