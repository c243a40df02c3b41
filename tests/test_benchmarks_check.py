"""BENCHMARKS.md's JSON-backed blocks are rebuilt from benchmarks/results/ and must match (cheap: no model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _check(file: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/run_all.py", "--check", "--file", str(file)], cwd=ROOT,
                          capture_output=True, text=True)


def test_benchmarks_md_matches_its_json():
    r = _check(ROOT / "BENCHMARKS.md")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "JSON-backed blocks match" in r.stdout and " 0 JSON-backed" not in r.stdout


def test_check_fails_on_an_edited_number(tmp_path):
    text = (ROOT / "BENCHMARKS.md").read_text()
    start = text.index("<!-- generated:")
    body_at = text.index("%", start)  # the first percentage inside the first generated block
    edited = text[:body_at - 1] + ("1" if text[body_at - 1] != "1" else "2") + text[body_at:]
    f = tmp_path / "B.md"
    f.write_text(edited)
    r = _check(f)
    assert r.returncode == 1 and "differ from their JSON" in r.stdout, r.stdout
    # and --render puts the JSON's numbers back
    subprocess.run([sys.executable, "benchmarks/run_all.py", "--render", "--file", str(f)], cwd=ROOT, check=True,
                   capture_output=True)
    assert f.read_text() == text


def test_no_command_shown_uses_a_path_outside_the_repository():
    import re

    text = (ROOT / "BENCHMARKS.md").read_text()
    commands = re.findall(r"`([^`]*(?:prunetune|benchmarks/)[^`]*)`", text)
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    shown = "\n".join(commands + blocks)
    assert not re.search(r"(?<![\w.])/(tmp|work|home|root)/", shown), [
        line for line in shown.splitlines() if re.search(r"(?<![\w.])/(tmp|work|home|root)/", line)]
