"""The README as a user reads it: its quoted commands print what it quotes, its CLI usage block
lists every option the program takes, and its Python API snippet runs as written."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from helpers import ROOT
from runtime.batch import build_parser as batch_parser
from runtime.caption import build_parser as caption_parser
from runtime.classify import build_parser as classify_parser
from runtime.retrieve import build_parser as retrieve_parser

README = (ROOT / "README.md").read_text()


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def console_commands() -> list[tuple[str, str]]:
    """(command, the output quoted under it) for every `$ ...` line of every console block."""
    pairs = []
    for block in fenced("console"):
        for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            pairs.append((command, output))
    return pairs


def test_quoted_commands_print_what_the_readme_quotes(tmp_path):
    assert console_commands(), "the README quotes no command output"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}  # retrieve's cache, not the user's
    for command, output in console_commands():
        program, *args = shlex.split(command)
        assert program == "python", command
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout == output, command


@pytest.mark.parametrize("start, parser", [("python -m runtime.caption IMAGE", caption_parser),
                                           ("python -m runtime.batch INPUT", batch_parser),
                                           ("python -m runtime.classify IMAGE", classify_parser),
                                           ("python -m runtime.retrieve FOLDER", retrieve_parser)])
def test_cli_usage_block_lists_every_option(start, parser):
    usage = next(b for b in fenced("bash") if b.startswith(start))
    options = {o for a in parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert set(re.findall(r"--[a-z-]+", usage)) == options


def test_python_api_snippet_runs_as_written():
    snippet = next(b for b in fenced("python") if b.startswith("from runtime import Captioner"))
    r = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "missing.png missing.png: no such file"
