"""Real DeepSpeed ZeRO-3 training in 2 CPU processes (gloo) on the tiny model with persistence
thresholds 0, so every parameter really is partitioned: SFT (LoRA, packed, merged model saved),
DPO continuing its adapter with precomputed reference log-probs, and a full fine-tune. What they
save reloads and generates."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import tiny_config

from tuneloop.config import load_config
from tuneloop.tiny import tiny_training_files
from tuneloop.train.launch import build_spec, launch

pytestmark = pytest.mark.integration


def _generate(model, tok, text: str = "Hello, my parcel is late") -> str:  # noqa: ANN001
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1]:])


def _assert_partitioned(result: dict) -> None:
    z = result["zero"]
    assert result["world_size"] == 2 and result["deepspeed"] == "zero3"
    assert z["partitioned_params"] == z["params"] > 0, z
    assert 0.45 <= z["local_fraction"] <= 0.55, f"each of 2 ranks should hold half the values: {z}"


class _TrainerStatusServer(ThreadingHTTPServer):
    """Stands in for the Kubeflow Trainer controller's runtime-status endpoint: records every POST."""

    def __init__(self) -> None:
        self.posts: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(h) -> None:  # noqa: N805 - the handler's self
                body = h.rfile.read(int(h.headers.get("Content-Length", 0)))
                self.posts.append({"auth": h.headers.get("Authorization"), **json.loads(body)})
                h.send_response(200)
                h.end_headers()

            def log_message(h, *a) -> None:  # noqa: N805, ANN002
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    tmp = tmp_path_factory.mktemp("zero3")
    # as inside a TrainJob with runtime status on: the controller's URL and a token file in the environment
    status = _TrainerStatusServer()
    threading.Thread(target=status.serve_forever, daemon=True).start()
    (tmp / "token").write_text("sa-token")
    mp.setenv("KUBEFLOW_TRAINER_SERVER_URL", f"http://127.0.0.1:{status.server_address[1]}/status")
    mp.setenv("KUBEFLOW_TRAINER_SERVER_TOKEN", str(tmp / "token"))
    sft_data, pref_data = tiny_training_files(tmp / "data", tiny_model_dir)
    cfg = load_config(tiny_config(tmp, tiny_model_dir, train__save_merged_model=True,
                                  train__dpo={"max_steps": 3, "per_device_batch_size": 2, "learning_rate": 5e-3,
                                              "logging_steps": 1, "max_length": 128,
                                              "precompute_ref_log_probs": True}))
    sft = launch(cfg, build_spec(cfg, "sft", tiny_model_dir, sft_data, tmp / "sft", pipeline_run="z"), "z")
    dpo = launch(cfg, build_spec(cfg, "dpo", tiny_model_dir, pref_data, tmp / "dpo", tmp / "sft" / "adapter",
                                 pipeline_run="z"), "z")
    mp.undo()
    status.shutdown()
    yield {"tmp": tmp, "sft": sft, "dpo": dpo, "cfg": cfg, "sft_data": sft_data, "trainer_status": status.posts}


def test_training_progress_reaches_the_trainjob_status(trained) -> None:
    """Rank 0 reports progress, ETA and metrics the way Kubeflow Trainer's TrainJob status takes them."""
    posts = trained["trainer_status"]
    assert posts and all(p["auth"] == "Bearer sa-token" for p in posts)
    status = [p["trainerStatus"] for p in posts]
    assert all("lastUpdatedTime" in s for s in status)
    assert status[0]["progressPercentage"] == 0
    assert [s["progressPercentage"] for s in status].count(100) == 2  # the end of sft and of dpo
    names = {m["name"] for s in status for m in s.get("metrics", [])}
    assert {"loss", "total_steps"} <= names  # per-step posts are rate-limited; begin and end always go


def test_sft_zero3_partitions_and_its_adapter_and_merged_model_generate(trained, tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.models import load_causal_lm

    sft, tmp = trained["sft"], trained["tmp"]
    _assert_partitioned(sft)
    assert sft["steps"] == 4 and sft["train_tokens"] > 0 and sft["tokens_per_s"] > 0
    with_adapter, tok = load_causal_lm(tiny_model_dir, tmp / "sft" / "adapter")
    _generate(with_adapter, tok)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp / "sft" / "merged")).eval()
    _generate(merged, AutoTokenizer.from_pretrained(str(tmp / "sft" / "merged")))
    ids = tok("billing or shipping?", return_tensors="pt")
    with torch.no_grad():
        a, b = with_adapter(**ids).logits, merged(**ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()(**ids).logits
    assert torch.allclose(a, b, atol=1e-4), "the merged model is base + adapter"
    assert not torch.allclose(a, base, atol=1e-4), "training changed the model"


def test_dpo_zero3_continues_the_sft_adapter(trained, tiny_model_dir) -> None:
    from safetensors.torch import load_file

    from tuneloop.models import load_causal_lm

    dpo, tmp = trained["dpo"], trained["tmp"]
    _assert_partitioned(dpo)
    assert dpo["steps"] == 3 and dpo["first_loss"] == pytest.approx(0.6931, abs=1e-3), \
        "starting from the SFT adapter with the adapter-disabled base as reference, the first DPO loss is ln 2"
    model, tok = load_causal_lm(tiny_model_dir, tmp / "dpo" / "adapter")
    _generate(model, tok)
    a = load_file(str(tmp / "sft" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp / "dpo" / "adapter" / "adapter_model.safetensors"))
    assert any(float((a[k] - b[k]).abs().max()) > 0 for k in a), "DPO moved the adapter"


def test_full_fine_tune_zero3_saves_a_model_that_generates(trained, tiny_model_dir, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TUNELOOP_ZERO3_PARTITION_ALL", "1")
    cfg, tmp = trained["cfg"], trained["tmp"]
    spec = build_spec(cfg, "sft", tiny_model_dir, trained["sft_data"], tmp / "full", pipeline_run="full")
    train = spec.train.model_copy(update={"method": "full", "save_merged_model": False,
                                         "sft": spec.train.sft.model_copy(update={"max_steps": 2})})
    spec = spec.model_copy(update={"train": train})
    result = launch(cfg, spec, "full")
    _assert_partitioned(result)
    model = AutoModelForCausalLM.from_pretrained(str(tmp / "full" / "model")).eval()
    _generate(model, AutoTokenizer.from_pretrained(str(tmp / "full" / "model")))
    assert not (tmp / "full" / "adapter").exists()
