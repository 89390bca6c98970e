"""The README's examples run (issue 12): every ``python`` block, and the ``vlmscope summary``,
``check``, ``diff`` and ``snapshot`` lines of the ``bash`` blocks, so they cannot go stale.

Each python block runs on its own in a fresh interpreter, statement by statement as in a notebook
(each expression's repr is shown; a snippet that forgets an import fails here as it would for a
reader), in a temporary directory holding ``examples/``, ``traces/examples/``
and ``traces/golden/``; a trace path the README makes up (``traces/a.h5``, ``mqwen.h5``) is a copy
of an example trace. A block that defines pytest tests runs under pytest with the vlmscope plugin,
once with ``--vlmscope-update`` and once comparing. A block that needs the optional ``notebook``
extra (pandas, matplotlib) runs for real when they are installed, and must otherwise fail with the
ImportError that names the extra.
The blocks (and the commands) run side by side, each in its own process with one torch thread,
then are judged in order.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLES = ROOT / "traces" / "examples"
QWEN25 = EXAMPLES / "tiny-qwen2.5-vl-astronaut.h5"
MQWEN = EXAMPLES / "tiny-mqwen-astronaut.h5"
#: the subcommands of the bash blocks that read traces (cheap); record, view and the rest are not run
READERS = {"summary", "check", "diff", "snapshot"}
EXTRA_HINT = "pip install 'vlmscope[notebook]'"


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(text: str) -> list[list[str]]:
    """The ``vlmscope summary|check|diff|snapshot`` command lines of the bash blocks (comments cut)."""
    out = []
    for lang, code in blocks(text):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in code.replace("\\\n", " ").splitlines():    # join "\"-continued lines
            argv = shlex.split(line, comments=True)
            if len(argv) >= 2 and Path(argv[0]).name == "vlmscope" and argv[1] in READERS:
                out.append(argv[1:])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "examples", d / "examples")
    shutil.copytree(EXAMPLES, d / "traces" / "examples")
    shutil.copytree(ROOT / "traces" / "golden", d / "traces" / "golden")
    return d


#: runs a README block as a notebook cell or the REPL would: each top-level expression's value
#: is shown (its repr), so the reprs the README promises are exercised too
RUNNER = """
import ast, sys
path = sys.argv[1]
src = open(path, encoding="utf-8").read()
ns = {"__name__": "__main__"}
for stmt in ast.parse(src, path).body:
    exec(compile(ast.Interactive(body=[stmt]), path, "single"), ns)
"""


def _run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VLMSCOPE_NO_FORK", None)
    env.setdefault("OMP_NUM_THREADS", "1")      # runs side by side (_parallel): no two torch thread pools spinning
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _has_notebook_extra(cwd: Path) -> bool:
    return _run([sys.executable, "-P", "-c", "import pandas, matplotlib"], cwd).returncode == 0


def _plugin_args() -> list[str]:
    if any(e.value == "vlmscope.pytest_plugin" for e in importlib.metadata.entry_points(group="pytest11")):
        return []
    return ["-p", "vlmscope.pytest_plugin"]


def _place_traces(argv: list[str], cwd: Path) -> None:
    """Give every ``.h5`` argument the README names a trace: a copy of an example trace."""
    for a in argv:
        if a.endswith(".h5") and not (cwd / a).exists():
            (cwd / a).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(MQWEN if "mqwen" in Path(a).name else QWEN25, cwd / a)


def _parallel(jobs: list) -> list:
    """Run independent jobs (each a callable that runs subprocesses) all at the same time (one
    thread each: see ``_run``); their results in order. The README's blocks and commands share
    no files they write."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))


def test_readme_python_blocks_run(workdir):
    text = README.read_text(encoding="utf-8")
    py = [code for lang, code in blocks(text) if lang == "python"]
    assert len(py) >= 5, "the README's python examples were not found"
    (workdir / "readme_runner.py").write_text(RUNNER, encoding="utf-8")
    # set-up in order (traces placed, files written), then every block's run(s) at once
    jobs = []
    for i, code in enumerate(py):
        written = set(re.findall(r"out=[\"']([^\"']+)", code))          # traces the block records
        _place_traces([p for p in re.findall(r"[\"']([\w./-]+\.h5)[\"']", code) if p not in written], workdir)
        if re.search(r"^def test_", code, re.M):
            d = workdir / f"plugin{i}"
            d.mkdir()
            (d / "examples").symlink_to(workdir / "examples")
            (d / "test_readme_example.py").write_text(code, encoding="utf-8")
            base = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", *_plugin_args(),
                    "test_readme_example.py"]

            def plugin_runs(base=base, d=d):
                first = _run(base + ["--vlmscope-update"], d)
                goldens = list((d / "__vlmscope__").rglob("*.json"))
                return first, goldens, _run(base, d)        # the comparing run needs the goldens
            jobs.append(plugin_runs)
            continue
        script = workdir / f"block{i}.py"
        script.write_text(code, encoding="utf-8")
        jobs.append(lambda name=script.name: _run([sys.executable, "-P", "readme_runner.py", name], workdir))
    jobs.append(lambda: _has_notebook_extra(workdir))
    *results, has_extra = _parallel(jobs)
    kinds = set()
    for i, (code, res) in enumerate(zip(py, results)):
        if re.search(r"^def test_", code, re.M):
            kinds.add("pytest")
            r, goldens, r2 = res
            assert r.returncode == 0, f"README block {i} (--vlmscope-update):\n{code}\n{r.stdout}{r.stderr}"
            assert goldens, f"README block {i} wrote no golden snapshot"
            r = r2
            assert r.returncode == 0 and "1 passed" in r.stdout, f"README block {i}:\n{code}\n{r.stdout}{r.stderr}"
            continue
        r = res
        if ".to_pandas()" in code or "vlmscope.plot." in code:
            kinds.add("notebook-extra")
            if has_extra:
                assert r.returncode == 0, f"README block {i}:\n{code}\n{r.stderr}"
                for out in re.findall(r"savefig\(\"([^\"]+)\"\)", code):
                    assert (workdir / out).stat().st_size > 1000, out
            else:
                assert r.returncode == 1 and "ImportError" in r.stderr and EXTRA_HINT in r.stderr, \
                    f"README block {i} without pandas/matplotlib:\n{r.stderr}"
            continue
        kinds.add("script")
        assert r.returncode == 0, f"README block {i}:\n{code}\n{r.stderr}"
        if "t.view(" in code:                        # the notebook block: readable reprs, strings resolved
            kinds.add("notebook")
            assert "<vlmscope.Trace traces/examples/tiny-qwen2.5-vl-astronaut.h5: format 3, complete, 4 steps>" \
                in r.stdout, r.stdout
            assert "<vlmscope step 1: decode" in r.stdout and "events of step 0: 65 rows" in r.stdout
            assert "probes of kind position_ids of step 1: 8 rows" in r.stdout
            assert "model.language_model.rotary_emb" in r.stdout
    assert kinds == {"pytest", "notebook-extra", "notebook", "script"}
    assert (workdir / "traces" / "run.h5").is_file() and (workdir / "traces" / "run2.h5").is_file()


def test_readme_trace_commands_run(workdir):
    cmds = shell_commands(README.read_text(encoding="utf-8"))
    assert {c[0] for c in cmds} == READERS, cmds
    for argv in cmds:
        _place_traces(argv, workdir)
    runs = _parallel([lambda argv=argv: _run([sys.executable, "-P", "-m", "vlmscope.cli", *argv], workdir)
                      for argv in cmds])
    for argv, r in zip(cmds, runs):
        where = f"vlmscope {shlex.join(argv)}:\n{r.stdout[-2000:]}{r.stderr}"
        assert "Traceback" not in r.stderr, where
        assert r.stdout.strip() or "-o" in argv, where
        if argv[0] in ("summary",) or (argv[0] == "snapshot" and "--compare" not in argv):
            assert r.returncode == 0, where
        else:
            assert r.returncode in (0, 1), where        # 1: violations or differences, as documented
        if argv[0] == "snapshot" and "-o" in argv:
            assert (workdir / argv[argv.index("-o") + 1]).read_text().startswith("{")
