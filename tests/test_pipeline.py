"""The precompute pipeline's house rules: one-way imports inside pipeline/ (no driver <-> executor cycle), no private
names borrowed across modules, the old modules gone, and the one d_in check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_architecture import ROOT, _imports

PIPELINE = ROOT / "precompute" / "pipeline"


def test_executors_and_the_stream_never_import_the_driver():
    for name in ("executors", "stream", "tables", "loading", "spec", "workdir", "publish"):
        mods = _imports(PIPELINE / f"{name}.py")
        assert "saescope.precompute.pipeline.driver" not in mods, name
        assert "saescope.precompute.pipeline" not in mods, f"{name} imports the package (and so the driver)"


def test_no_private_names_are_imported_across_modules():
    offenders = []
    for p in sorted(PIPELINE.rglob("*.py")) + sorted((ROOT / "app" / "cli").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                offenders += [f"{p.relative_to(ROOT)}: {a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert offenders == []


def test_the_old_driver_modules_are_gone():
    for old in ("precompute/run.py", "precompute/distributed.py", "precompute/store/spill.py", "app/cli.py",
                "app/commands.py"):
        assert not (ROOT / old).exists(), old


def test_the_d_in_check_names_both_widths(tiny_lm_dir, tmp_path):
    """check_d_in against the model's real hook width (read here from the model's config)."""
    import json

    from saescope.precompute.encode import check_d_in
    from saescope.precompute.errors import UserError
    from saescope.precompute.models import load_model
    from saescope.precompute.saes import SAEConfig
    from saescope.precompute.saes.standard import StandardSAE

    width = json.loads((Path(tiny_lm_dir) / "config.json").read_text())["hidden_size"]
    lm = load_model(str(tiny_lm_dir), "cpu", "float32")
    ok = StandardSAE(SAEConfig(architecture="standard", d_in=width, d_sae=8, hook_name="blocks.0.hook_resid_post"))
    check_d_in(lm, ok)
    bad = StandardSAE(SAEConfig(architecture="standard", d_in=width + 1, d_sae=8, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(UserError, match=f"d_in={width + 1}, but blocks.0.hook_resid_post of model .* has width {width}"):
        check_d_in(lm, bad, sae_name="bad")
