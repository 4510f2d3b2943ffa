"""Long loops log their progress with an ETA (tuneloop.progress): the first step, the last,
and at most one line per interval in between."""

from __future__ import annotations

import logging

import pytest

from tuneloop.progress import Progress

pytestmark = pytest.mark.unit


def test_first_last_and_throttled_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tuneloop.progress")
    p = Progress("evaluate candidate answers", 176, every_s=3600)
    for _ in range(22):
        p.update(8)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("evaluate candidate answers: 8/176 (5%) elapsed ") and " eta " in lines[0]
    assert lines[1].startswith("evaluate candidate answers: 176/176 (100%)") and lines[1].endswith("eta 0s")


def test_every_update_logs_when_the_interval_is_zero(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "tuneloop.progress")
    p = Progress("drift embeddings", 3, every_s=0)
    for _ in range(3):
        p.update()
    assert [r.getMessage().split(" elapsed")[0] for r in caplog.records] == \
        ["drift embeddings: 1/3 (33%)", "drift embeddings: 2/3 (67%)", "drift embeddings: 3/3 (100%)"]


def test_scoring_reports_progress_on_a_real_model(caplog: pytest.LogCaptureFixture, tiny_model_dir) -> None:
    from tuneloop.evaluate.scoring import generate
    from tuneloop.models import load_causal_lm

    caplog.set_level(logging.INFO, "tuneloop.progress")
    model, tok = load_causal_lm(tiny_model_dir, None)
    answers = generate(model, tok, ["hello", "my parcel", "is late"], 2, 2, "evaluate base answers")
    assert len(answers) == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("evaluate base answers: 2/3") and msgs[-1].startswith("evaluate base answers: 3/3")
