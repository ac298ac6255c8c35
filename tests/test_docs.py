"""The documentation agrees with the code: every option is in the README and docs/cli.md, --help
has examples, the README's first command can be run twice, and nothing points at a document
outside the repository."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxcompress import inspect as inspect_mod
from onnxcompress import sweep as sweep_mod
from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent


def options(command) -> set[str]:
    """Every long option of a click command (`--intercept/--no-intercept` gives both)."""
    found = set()
    for param in command.params:
        for opt in list(getattr(param, "opts", [])) + list(getattr(param, "secondary_opts", [])):
            if opt.startswith("--") and opt != "--help":
                found.add(opt)
    return found


def table_options(text: str) -> set[str]:
    """Options named in the first column of the markdown tables of `text`."""
    found = set()
    for row in re.findall(r"^\| (.+?) \|", text, flags=re.M):
        found |= set(re.findall(r"`(--[a-z][a-z0-9-]*)", row))
    return found


def test_every_option_is_in_the_readme_and_the_cli_docs():
    compress_opts = options(main) - {"--version"}
    readme = table_options((ROOT / "README.md").read_text())
    assert compress_opts - readme == set(), "options missing from the README's table"
    cli_doc = (ROOT / "docs" / "cli.md").read_text()
    assert compress_opts - table_options(cli_doc) == set()
    for command in (inspect_mod.command, sweep_mod.command):
        assert options(command) - table_options(cli_doc) == set()
    assert readme - compress_opts - {"--help"} == set(), "the README names an option that does not exist"


def test_help_lists_every_option_and_examples():
    r = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert r.exit_code == 0
    for opt in options(main):
        assert opt in r.output
    assert "Examples:" in r.output and "onnxcompress inspect model.onnx" in r.output
    for sub in ("inspect", "sweep"):
        r = CliRunner().invoke(main, [sub, "--help"])
        assert r.exit_code == 0 and f"onnxcompress {sub}" in r.output


def test_nothing_points_at_an_outside_design_document():
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("onnxcompress/**/*.py"),
             *ROOT.glob("tools/*"), *ROOT.glob("tests/*.py")]
    hits = [str(p) for p in files if p.is_file() and p.name != "test_docs.py"
            and re.search(r"design\.md", p.read_text(errors="replace"))]
    assert hits == []
    linked = re.findall(r"\]\((docs/[^)#]+)\)", (ROOT / "README.md").read_text())
    assert linked and all((ROOT / link).exists() for link in linked)


def test_the_readme_first_command_runs_twice(tmp_path):
    first = (ROOT / "README.md").read_text().split("```")[1].strip().splitlines()[0]
    args = shlex.split(first.split("&&", 1)[1])
    assert args[0] == "onnxcompress" and "--force" in args
    shutil.copytree(ROOT / "models", tmp_path / "models")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "onnxcompress", *args[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
        assert re.search(r"accuracy of 'logits' against .*: original [0-9.]+, compressed [0-9.]+", r.stdout)
    assert (tmp_path / "models" / "digits_cnn.compressed.onnx").exists()


def test_the_readme_output_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "models/digits_cnn.compressed.onnx"])
    assert r.returncode == 0


def test_no_text_file_holds_merge_conflict_markers():
    """A merge left unresolved must never reach users: no line of a tracked text file starts with
    a conflict marker."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    bad = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".md", ".py", ".toml", ".txt", ".cfg", ".yml", ".yaml", ""} and path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if marker.search(text):
                bad.append(name)
    assert bad == []
