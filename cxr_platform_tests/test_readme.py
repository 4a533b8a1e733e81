"""Every command the README shows, run as a reader would run it after the quick start.

Each ```bash block is one test, in README order, in one shell with the virtual environment on
the PATH, over the home the demo fixture made (the state `make demo` leaves). A block that cannot
finish in two minutes on two cores, or needs what this machine lacks (a PACS on the network, a
Docker engine, GPUs, a server left running), carries a comment right above it:

    <!-- README test: skip: <why> -->

and is reported as skipped with that reason. A command that may rightly end with another exit
code says so the same way (``<!-- README test: exit 0 or 3 -->``).

What differs from a reader's machine, so the blocks run in seconds: ``CXR_DATA_DIR`` is a
40-patient synthetic folder in the class-folder layout, images are 64 px, the demo profile
trains, and the blocks run in a scratch folder rather than the checkout. What the commands print
and write is checked by the tests of each command; here they must run as written and succeed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from cxr_platform_tests.conftest import REPO_ROOT, run_demo

README = REPO_ROOT / "README.md"
LIMIT_S = 120
_FENCE = re.compile(r"^```(\w*)\s*$")
_ANNOTATION = re.compile(r"<!--\s*README test:\s*(skip|exit)\s*:?\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    line: int
    section: str
    code: str
    skip: str | None = None
    exit_codes: tuple[int, ...] = (0,)

    @property
    def name(self) -> str:
        words = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")
        return f"L{self.line}-{words}"


def readme_blocks(text: str) -> list[Block]:
    """The README's ```bash blocks, each with the annotation right above it, if any."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section = "top"
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        fence = _FENCE.match(line.strip())
        if not fence:
            index += 1
            continue
        end = index + 1
        while not lines[end].strip().startswith("```"):
            end += 1
        if fence.group(1) == "bash":
            above = lines[index - 1].strip() if index else ""
            annotation = _ANNOTATION.fullmatch(above)
            skip, exit_codes = None, (0,)
            if annotation and annotation.group(1) == "skip":
                skip = annotation.group(2)
            elif annotation:
                exit_codes = tuple(int(code) for code in re.findall(r"\d+", annotation.group(2)))
            blocks.append(
                Block(index + 1, section, "\n".join(lines[index + 1 : end]), skip, exit_codes)
            )
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_the_readme_parser_reads_annotations():
    text = "\n".join(
        [
            "## Serving",
            "<!-- README test: skip: a server -->",
            "```bash",
            "cxr serve",
            "```",
            "<!-- README test: exit 0 or 3 -->",
            "```bash",
            "cxr promote shadow",
            "```",
            "```text",
            "cxr [OPTIONS]",
            "```",
        ]
    )
    serve, promote = readme_blocks(text)
    assert (serve.skip, serve.code, serve.section) == ("a server", "cxr serve", "Serving")
    assert (promote.skip, promote.exit_codes) == (None, (0, 3))
    assert all(block.skip for block in BLOCKS if "make test" in block.code)  # not itself


@pytest.fixture(scope="module")
def reader(tiny_synthetic, tmp_path_factory) -> dict[str, object]:
    """The reader's shell: a home where `cxr demo` ran, their own data folder, a scratch folder.
    The home is the reader's own, not the session's ``demo``: the README's commands register,
    promote and train, and the demo's tests expect the home as `cxr demo` left it."""
    demo = run_demo(tmp_path_factory.mktemp("readme-demo"))
    data = tmp_path_factory.mktemp("readme-data") / "chest_xray"
    labels = pd.read_csv(tiny_synthetic / "labels.csv")
    for row in labels.itertuples():
        target = data / row.label / Path(row.file).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_synthetic / row.file, target)
    env = {
        **demo.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CXR_DATA_DIR": str(data),
        "CXR_TRAINING_PROFILE": "demo",
    }
    return {"env": env, "cwd": tmp_path_factory.mktemp("readme-work")}


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_readme_command(block: Block, reader):
    if block.skip:
        pytest.skip(f"README line {block.line}: {block.skip}")
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block.code],
            cwd=reader["cwd"],
            env=reader["env"],
            capture_output=True,
            text=True,
            timeout=LIMIT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"README line {block.line} ran past {LIMIT_S} s: mark it skipped with the reason, "
            "or make it faster"
        )
    took = time.monotonic() - started
    assert result.returncode in block.exit_codes, (
        f"README line {block.line} exited {result.returncode} after {took:.0f} s\n"
        f"{block.code}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
