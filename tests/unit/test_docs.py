"""The README and docs/: the generated configuration page is current, every relative link and
anchor resolves, the README stays short, and every command marked runnable runs as written.

A fenced ```bash block right after a line ``<!-- runnable -->`` is run by
``test_runnable_commands_run_as_written``: ``bash -euo pipefail``, in a fresh temporary folder
(where the repository's ``examples/`` and ``configs/`` are linked, so commands written for the
repository root find them, and every output lands in the temporary folder), with the venv on
``PATH``, Open MPI allowed to run as root and to oversubscribe, one thread per rank.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, mpi_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 260
MARK = "<!-- runnable -->"
BLOCK_TIMEOUT = 120  # seconds, per runnable block
LINKED = ("examples", "configs")  # repository folders the runnable commands read

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"``.*?``|`[^`]*`", re.DOTALL)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((no, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (links by their text, code spans by their
    content), lowercased, punctuation other than ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor on ``page``; a repeated one gets GitHub's -1, -2, ... suffix."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _outside_fences(page.read_text()):
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)(?:\s+#+)?\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code, link texts that wrap over
    lines included."""
    kept = dict(_outside_fences(page.read_text()))
    lines = page.read_text().splitlines()
    prose = "\n".join(kept.get(no, "") for no in range(1, len(lines) + 1))
    # code spans blanked, newlines kept, so that offsets still give line numbers
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), prose)
    return [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(prose)]


def runnable_blocks(mark: str = MARK) -> list[tuple[str, str]]:
    """(``page:line``, script) of every ```bash block right after the line ``mark``
    (tests/slurm/test_docs_commands.py runs those marked for the emulated cluster)."""
    blocks = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() != mark:
                continue
            assert lines[i + 1].strip() == "```bash", (
                f"{_rel(page)}:{i + 1}: {mark} must be followed by a ```bash block"
            )
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append((f"{_rel(page)}:{i + 2}", "\n".join(lines[i + 2 : end]) + "\n"))
    return blocks


BLOCKS = runnable_blocks()


def run_block(script: str, cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run ``script`` with ``bash -euo pipefail`` in ``cwd``, in a session of its own (killed
    whole past ``timeout`` s: mpirun, ranks, workers); fails the test unless it exits 0.
    Returns its output (stdout and stderr)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"still running after {timeout} s:\n{script}\n{out[-4000:]}")
    assert proc.returncode == 0, (
        f"exit status {proc.returncode} after {time.monotonic() - t0:.1f} s:\n{script}\n"
        f"{out[-6000:]}"
    )
    return out


def _generator():
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "scripts" / "config_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_current() -> None:
    gen = _generator()
    expected = gen.render()
    current = gen.PAGE.read_text() if gen.PAGE.is_file() else ""
    if current != expected:
        old, new = current.splitlines(), expected.splitlines()
        first = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
            min(len(old), len(new)),
        )
        pytest.fail(
            f"docs/configuration.md is not current (from line {first + 1}): run "
            f"`python scripts/config_reference.py`\n  file:      "
            f"{old[first] if first < len(old) else '<end>'}\n  generated: "
            f"{new[first] if first < len(new) else '<end>'}"
        )


def test_slug_follows_github() -> None:
    assert slug("Two commands") == "two-commands"
    assert slug("Engines (--comm)") == "engines---comm"
    assert slug("Horovod (--comm horovod)") == "horovod---comm-horovod"
    assert slug("Leashed-SGD's setting") == "leashed-sgds-setting"
    assert slug("Stragglers, random delays, a pause: the rest") == (
        "stragglers-random-delays-a-pause-the-rest"
    )
    assert slug("[data] and snake_case") == "data-and-snake_case"


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for no, target in links(page):
            if SCHEME.match(target) or target.startswith("//"):
                continue  # a URL, not a file of this repository
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{_rel(page)}:{no}: {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading #{anchor} in {_rel(dest)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_reads_in_five_minutes() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail to docs/"
    )


def test_readme_keeps_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in text
    assert "bash scripts/test.sh" in text  # what .ci/run runs
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_every_page_starts_with_a_summary_and_a_link_back() -> None:
    for page in PAGES[1:]:
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# "), f"{_rel(page)}: no title on its first line"
        first = []
        for line in lines[2:]:
            if not line.strip():
                break
            first.append(line)
        paragraph = " ".join(first)
        assert paragraph and "](../README.md)" in paragraph, (
            f"{_rel(page)}: the paragraph under the title must summarise the page and link back "
            "to the README (../README.md)"
        )


def test_marked_blocks_need_no_cluster_gpu_or_network() -> None:
    assert 5 <= len(BLOCKS) <= 12, f"{len(BLOCKS)} runnable blocks: keep the test short"
    assert any(where.startswith("README.md:") for where, _ in BLOCKS)
    for where, script in BLOCKS:
        for word in ("sbatch", "srun", "sudo", "slurm_local", "cuda", "--download", "pip "):
            assert word not in script, f"{where}: {word!r} has no place in a runnable block"


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("script", [pytest.param(s, id=where) for where, s in BLOCKS])
def test_runnable_commands_run_as_written(script: str, tmp_path: Path) -> None:
    """Every command in README and docs marked runnable runs as written and exits 0."""
    for name in LINKED:
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    run_block(script, tmp_path, mpi_env({"PYTHONPATH": str(ROOT)}), BLOCK_TIMEOUT)
