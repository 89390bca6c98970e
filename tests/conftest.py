"""Shared fixtures: traces recorded once per test session from the embedded tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "astronaut.png"
PROMPT = "Describe this image."


def _record(name: str, out: Path, max_new_tokens: int = 4, **options) -> Path:
    import vlmscope_models
    from vlmscope.recorder import record

    model, proc = vlmscope_models.load_embedded(name, **options)
    return record(model, proc, image=str(IMAGE), prompt=PROMPT, out=out, max_new_tokens=max_new_tokens)


@pytest.fixture(scope="session")
def record_embedded():
    """``record_embedded(name, out, max_new_tokens=4, **options)``: record an embedded model on
    astronaut.png, as the session fixtures below do; returns the trace path."""
    return _record


@pytest.fixture(scope="session")
def qwen25_trace_path(tmp_path_factory) -> Path:
    """tiny-qwen2.5-vl, eager attention, astronaut.png, 4 new tokens."""
    return _record("tiny-qwen2.5-vl", tmp_path_factory.mktemp("q25") / "q25.h5")


@pytest.fixture(scope="session")
def qwen2_trace_path(tmp_path_factory) -> Path:
    """tiny-qwen2-vl, eager attention, astronaut.png, 4 new tokens."""
    return _record("tiny-qwen2-vl", tmp_path_factory.mktemp("q2") / "q2.h5")


@pytest.fixture(scope="session")
def mqwen_trace_path(tmp_path_factory) -> Path:
    """tiny-mqwen, astronaut.png, 4 new tokens."""
    return _record("tiny-mqwen", tmp_path_factory.mktemp("mq") / "mq.h5")


@pytest.fixture
def qwen25_trace(qwen25_trace_path):
    import vlmscope

    with vlmscope.open_trace(qwen25_trace_path) as t:
        yield t


@pytest.fixture
def qwen2_trace(qwen2_trace_path):
    import vlmscope

    with vlmscope.open_trace(qwen2_trace_path) as t:
        yield t


@pytest.fixture(scope="session")
def batch_rows_trace(tmp_path_factory) -> dict:
    """tiny-qwen2-vl, two generate calls under one Recorder (a left-padded B=3 batch: one image,
    text only, two images; then one row), and what each row must show: see
    ``tests/view/batch_traces.py`` (the viewer's and the summary's batch-row tests)."""
    return _batch_traces().record_batch(tmp_path_factory.mktemp("batch_rows") / "batch.h5")


@pytest.fixture(scope="session")
def batch_video_trace(tmp_path_factory) -> dict:
    """tiny-qwen2.5-vl, one call of two left-padded rows (a 4-frame video; one image), and the
    video's grid, ``second_per_grid_ts`` and span (``tests/view/batch_traces.py``)."""
    return _batch_traces().record_video(tmp_path_factory.mktemp("batch_video") / "video.h5")


def _batch_traces():
    import importlib.util
    import sys

    if "batch_traces" not in sys.modules:
        spec = importlib.util.spec_from_file_location("batch_traces", ROOT / "tests" / "view" / "batch_traces.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["batch_traces"] = mod
    return sys.modules["batch_traces"]
