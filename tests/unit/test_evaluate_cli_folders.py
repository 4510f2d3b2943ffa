"""`tuneloop evaluate` names the flag when a folder is neither a LoRA adapter nor a model (instead of failing
deep inside transformers on a missing tokenizer)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("flag", ["--candidate", "--champion"])
def test_a_folder_that_is_no_model_is_refused_naming_the_flag(tmp_path, flag):
    from tuneloop.evaluate.run import evaluate_paths

    gates = tmp_path / "gates.yaml"
    gates.write_text("slices: {general_qa: {task: generation}}\ngates: [{metric: nll, slice: general_qa, max: 9}]\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    empty = tmp_path / "kfp-output"  # e.g. the task's artifact folder that holds adapter/ one level down
    (empty / "adapter").mkdir(parents=True)
    candidate, champion = (empty, None) if flag == "--candidate" else (model, empty)
    with pytest.raises(FileNotFoundError, match=f"{flag} {empty}: neither a LoRA adapter folder"):
        evaluate_paths(candidate, champion, [str(tmp_path / "eval.jsonl")], gates, tmp_path / "out")
