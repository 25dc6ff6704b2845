"""A check run as a readable summary, as JSON (everything, with provenance) and as JUnit XML (what CI systems read).

JUnit layout (the schema Jenkins, GitLab, GitHub Actions reporters and Azure read; junit-10.xsd):
    <testsuites name tests failures errors time>
      <testsuite name tests failures errors skipped time timestamp hostname>
        <properties><property name value/>...</properties>          (provenance: hashes, version, verify)
        <testcase name classname time>
          <failure message type>the numbers</failure> | <error message type>why it could not run</error>
          <system-out>the summary and the evidence texts</system-out>
        </testcase>
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .run import CheckRun

_XML_BAD = {c: None for c in range(32) if c not in (9, 10, 13)}  # characters XML 1.0 cannot hold


def _clean(s: str) -> str:
    return str(s).translate(_XML_BAD)


def summary_text(run: CheckRun) -> str:
    lines = []
    for r in run.results:
        status = "ERROR" if r.error else ("PASS " if r.passed else "FAIL ")
        lines.append(f"{status} {r.name} [{r.kind}, {r.sae_id}, line {r.line}]: {r.summary}")
        if not r.passed and r.evidence and r.kind in ("fires", "monitor"):
            shown = [e for e in r.evidence if e.get("active")][:3]
            for e in shown:
                lines.append(f"        fired ({e['max_act']:.3g} feature {e['feature']} at token {e['position']}) "
                             f"on {e['set']!r} text {e['index']}: {e['text'][:80]!r}")
    p = run.provenance
    verify = ", ".join(f"{s}: {'verified' if v['verify_ok'] else ('NOT verified' if v['verify_ok'] is False else 'never verified')}"
                       for s, v in p["saes"].items())
    lines.append(f"{len(run.results)} checks: {len(run.results) - run.failures - run.errors} passed, {run.failures} "
                 f"failed, {run.errors} errors in {run.seconds:.1f} s")
    lines.append(f"model {p['model']['path']} (sha256 {str(p['model']['sha256'])[:12]}), store {verify}, "
                 f"saescope {p['saescope_version']}")
    return "\n".join(lines)


def _num(x: Any) -> Any:  # JSON has no NaN/inf
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _num(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_num(v) for v in x]
    return x


def write_json(run: CheckRun, path: Path | str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_num(run.as_json()), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def junit_xml(run: CheckRun, suite: str | None = None) -> bytes:
    p = run.provenance
    n, fails, errs = len(run.results), run.failures, run.errors
    suite = suite or Path(run.check_file).name
    root = ET.Element("testsuites", name="saescope check", tests=str(n), failures=str(fails), errors=str(errs),
                      time=f"{run.seconds:.3f}")
    ts = ET.SubElement(root, "testsuite", name=_clean(suite), tests=str(n), failures=str(fails), errors=str(errs),
                       skipped="0", time=f"{run.seconds:.3f}", timestamp=p["date"][:19], hostname=_clean(p["host"] or "localhost"))
    props = ET.SubElement(ts, "properties")
    flat = {"saescope_version": p["saescope_version"], "check_file_sha256": p["check_file"]["sha256"],
            "store": p["store"]["path"], "model": p["model"]["path"], "model_sha256": p["model"]["sha256"] or "",
            "model_dtype": p["model"]["dtype"]}
    for s, v in p["saes"].items():
        flat[f"sae.{s}.sha256"] = v["sha256"] or ""
        flat[f"sae.{s}.verify_ok"] = str(v["verify_ok"]).lower()
    for k, v in flat.items():
        ET.SubElement(props, "property", name=_clean(k), value=_clean(str(v)))
    for r in run.results:
        tc = ET.SubElement(ts, "testcase", name=_clean(r.name), classname=f"saescope.check.{r.kind}",
                           time=f"{r.seconds:.3f}")
        if r.error is not None:
            el = ET.SubElement(tc, "error", message=_clean(r.error[:500]), type="CheckError")
            el.text = _clean(r.error)
        elif not r.passed:
            el = ET.SubElement(tc, "failure", message=_clean(r.summary[:500]), type="CheckFailed")
            el.text = _clean(json.dumps(_num({"expected": r.expected, "measured": _short(r.measured)}), indent=1))
        out = [f"{r.summary} (SAE {r.sae_id}, line {r.line})"]
        for e in r.evidence[:5]:
            out.append(json.dumps(_num({k: v for k, v in e.items() if k not in ("tokens", "acts", "feature_acts")}),
                                  ensure_ascii=False))
        ET.SubElement(tc, "system-out").text = _clean("\n".join(out))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _short(measured: dict[str, Any]) -> dict[str, Any]:
    """The measured numbers without the per-text tables (those are in the JSON)."""
    return {k: v for k, v in measured.items() if not k.startswith("per_text")}


def write_junit(run: CheckRun, path: Path | str) -> Path:
    path = Path(path)
    path.write_bytes(junit_xml(run))
    return path
