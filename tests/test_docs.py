"""The docs are tested like code: the site builds strictly, and every command block in
README.md and docs/ is run, checked or says why not.

Each fenced block (but ```text, which shows output) follows a marker comment that says how it
is tested:

- `<!-- run -->`: run as it stands (bash or python), in one scratch dir shared by all blocks, in
  order: README.md first (its quickstart writes `outputs/first`, which later blocks use), then
  docs/ pages in nav order.
- `<!-- run:smoke -->`: the same, with `debug=smoke` appended to each `dtlab-train` line and
  `eval.episodes=1` to each `dtlab-evaluate` line, so that a 3-minute command runs in seconds.
- `<!-- check -->`: each command line is composed by Hydra (sweeps at their first value) and
  checked against dtlab's config schema: every key, option and value it names exists and is
  allowed. For commands that need data, a GPU or hours (the paper table, SLURM).
- `<!-- ci:test -->`, `<!-- ci:onnx -->`: `.ci/run` runs them (the test command; the
  onnxruntime lines against DTModule.act).
- `<!-- illustrative: REASON -->`: not run, and the reason says why (network, your own data).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg
from hydra.core.override_parser.overrides_parser import OverridesParser

from dtlab.config import EvaluateConfig, TrainConfig, check_config

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- (run|run:smoke|check|ci:test|ci:onnx|illustrative: [^>]+) -->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
SMOKE = {"dtlab-train": "debug=smoke", "dtlab-evaluate": "eval.episodes=1"}
ENTRY_POINTS = {"train": "train", "evaluate": "evaluate", "collect": "collect", "export": "export"}


def pages() -> list[Path]:
    """README.md, then the docs pages in the site's nav order (the order run blocks run in)."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def walk(items: list) -> list[str]:
        return [p for item in items for v in item.values() for p in (walk(v) if isinstance(v, list) else [v])]

    return [ROOT / "README.md"] + [ROOT / "docs" / p for p in walk(nav)]


def blocks(path: Path) -> list[tuple[str, str, str, int]]:
    """(marker or "", language, body, line) of every fenced block in a page."""
    text = path.read_text()
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        found.append((marker.group(1) if marker else "", m.group(1), m.group(2), text[: m.start()].count("\n") + 1))
    return found


ALL = [(path, *b) for path in pages() for b in blocks(path)]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_command_block_says_how_it_is_tested():
    unmarked = [where(p, line) for p, marker, lang, _, line in ALL if not marker and lang != "text"]
    assert not unmarked, f"blocks without a run/check/ci/illustrative marker: {unmarked}"
    assert {m for _, m, *_ in ALL} >= {"run", "run:smoke", "check", "ci:test", "ci:onnx"}


def test_the_site_builds_strictly(tmp_path):
    """Broken links and anchors, and pages left out of the nav, fail the build (mkdocs.yml's
    validation block)."""
    if shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists():
        pytest.skip("mkdocs is not installed (pip install -e '.[dev]' brings mkdocs-material)")
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    env = os.environ | {"NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "data" / "index.html").is_file()


def command_lines(body: str) -> list[list[str]]:
    """The commands of a shell block, continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def report_options() -> set[str]:
    """The options dtlab-report's parser has, from its --help."""
    import contextlib
    import io

    from dtlab.report import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return set(re.findall(r"--[\w-]+", out.getvalue()))


def compose_command(args: list[str]) -> None:
    """Compose a dtlab-train/evaluate/collect/export command line's config and check it."""
    if args[:2] == ["python", "-m"]:
        name, rest = args[2].removeprefix("dtlab."), args[3:]
    else:
        assert args[0].startswith("dtlab-"), f"not a dtlab command: {shlex.join(args)} (mark the block illustrative)"
        name, rest = args[0].removeprefix("dtlab-"), args[1:]
    if name == "report":  # argparse, not Hydra: every option it is given must be one it has
        unknown = [a for a in rest if a.startswith("--") and a not in report_options()]
        assert not unknown, f"dtlab-report has no {unknown}"
        return
    assert name in ENTRY_POINTS, f"{name}: only Hydra entry points can be checked (mark the block illustrative)"
    rest = [a for a in rest if a not in ("-m", "--multirun")]
    if rest[:1] == ["--cfg"]:  # Hydra's own flags, which print instead of run
        rest = rest[2:]
    overrides = []
    for o in OverridesParser.create().parse_overrides(rest):
        if o.is_sweep_override():  # a multirun's sweep: its first value stands for all
            value = next(o.sweep_string_iterator())
            overrides.append(f"{o.get_key_element()}={value}")
        else:
            overrides.append(o.input_line)
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg(Path(out), *overrides, config=ENTRY_POINTS[name])
        if name == "train":
            check_config(cfg, TrainConfig)
        elif name == "evaluate":
            check_config(cfg, EvaluateConfig)


CHECKED = [(p, body, line) for p, marker, _, body, line in ALL if marker == "check"]


@pytest.mark.parametrize(("path", "body", "line"), CHECKED, ids=[where(p, line) for p, _, line in CHECKED])
def test_checked_commands_compose_and_pass_the_schema(path, body, line):
    for args in command_lines(body):
        compose_command(args)


def smoke(body: str) -> str:
    """Each dtlab-train / dtlab-evaluate line with its smoke overrides, put before any comment."""
    lines = []
    for line in body.splitlines():
        command = line.split()[0] if line.strip() else ""
        if command in SMOKE:
            code, sep, comment = line.partition(" #")
            assert not code.rstrip().endswith("\\"), "run:smoke needs one-line dtlab commands"
            line = f"{code.rstrip()} {SMOKE[command]}" + (f"  #{comment}" if sep else "")
        lines.append(line)
    return "\n".join(lines) + "\n"


RUN = [(p, marker, lang, body, line) for p, marker, lang, body, line in ALL if marker in ("run", "run:smoke")]


def test_run_blocks_run(tmp_path):
    """Every run block, in page order, in one scratch dir: real commands, smoke-sized."""
    python = sys.executable
    # the console scripts as functions of this interpreter, so that the source under test (and
    # not an older installed copy) runs, with or without an editable install
    preamble = "".join(
        f'dtlab-{n}() {{ "{python}" -m dtlab.{n} "$@"; }}\n'
        for n in ("train", "evaluate", "report", "export", "collect")
    )
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
    }
    for path, marker, lang, body, line in RUN:
        code = smoke(body) if marker == "run:smoke" else body
        if lang == "python":
            argv = [python, "-c", code]
        else:
            assert lang == "bash", where(path, line)
            argv = ["bash", "-euo", "pipefail", "-c", preamble + code]
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, env=env)
        print(f"{where(path, line)}: {time.perf_counter() - start:.1f} s")
        assert done.returncode == 0, f"{where(path, line)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "outputs" / "first" / "checkpoints" / "policy.onnx").is_file()


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc make it (for the headings these docs use)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readmes_links_reach_files_and_headings():
    """mkdocs checks the docs' own links; the README is outside the site, so its links to files
    and to headings of docs pages are checked here."""
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, target
