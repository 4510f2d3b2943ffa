"""The registered version as an MLflow model: a pyfunc over the base model and the version's LoRA adapter.

Why a pyfunc and not MLflow's transformers flavor: that flavor logs a whole pipeline - the base weights
again in every version (hundreds of MB to GBs, for an adapter of a few MB), or, for a peft model, a
reference to the base by its Hugging Face Hub id, which a GGUF base converted in the state directory does
not have and which a cluster without internet cannot fetch. Here the base lives once in durable storage
(the state directory, the state volume on a cluster) and a version is its adapter. The pyfunc keeps that
shape:

- the version's folder IS the PEFT adapter folder: `adapter_config.json` and the weights at its root,
  where vLLM/KServe, the gateway and the evaluation read them as before, with MLflow's `MLmodel`, this
  code file, the signature and an input example beside them;
- the base model is found through the model config: `base_model_path`, the materialised folder (a
  local path, on a cluster a path on the state volume). A base small enough (`BUNDLE_LIMIT_MB`, the
  tiny test models) is bundled instead, as the artifact `base_model`. Where the path does not exist (a
  laptop loading a cluster's version), pass your copy at load time:
  `mlflow.pyfunc.load_model(uri, model_config={"base_model_path": "/my/base"})`;
- it answers a prompt as the gateway does: the operator's system prompt (the one the adapter was
  trained with) first, the base's chat template, greedy decoding, the adapter merged into the base.

Models from code: MLflow copies this file into the model and runs it at load time (`set_model` at the
bottom), so loading needs mlflow, torch, transformers and peft, not tuneloop.
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

BUNDLE_LIMIT_MB = 64  # a base up to this size travels inside every version (tiny test models); larger: by path
INPUT_EXAMPLE = {"prompt": ["Where is my parcel? It was due on Monday."]}


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


class AdapterModel(PythonModel):
    """Base model + LoRA adapter (merged), generating greedily. Input: a DataFrame with a `prompt`
    column (or a dict/list/str of prompts); output: one answer per prompt. Param `max_new_tokens`."""

    def load_context(self, context: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = dict(context.model_config or {})
        base = (context.artifacts or {}).get("base_model") or config.get("base_model_path")
        if not base or not Path(base).exists():
            raise FileNotFoundError(
                f"base model {config.get('base_model', '')!r} not found at {base!r}; load with "
                "mlflow.pyfunc.load_model(uri, model_config={'base_model_path': '<its save_pretrained folder>'})")
        adapter = Path(__file__).resolve().parent  # the model's own folder is the adapter folder
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        self.model = (model.to("cuda") if torch.cuda.is_available() else model).eval()
        self.system_prompt = config.get("system_prompt")
        self.max_new_tokens = int(config.get("max_new_tokens", 64))

    def _prompt(self, text: str) -> str:
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[str]:
        import torch

        if isinstance(model_input, pd.DataFrame):
            prompts = [str(p) for p in model_input["prompt"]]
        elif isinstance(model_input, dict):
            p = model_input["prompt"]
            prompts = [p] if isinstance(p, str) else list(p)
        else:
            prompts = [model_input] if isinstance(model_input, str) else list(model_input)
        max_new = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        tok, device = self.tokenizer, next(self.model.parameters()).device
        out = []
        for text in prompts:
            enc = tok(self._prompt(text), return_tensors="pt", add_special_tokens=False).to(device)
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out


def signature(max_new_tokens: int = 64) -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec("max_new_tokens", "long", max_new_tokens)]))


def _requirements() -> list[str]:
    out = []
    for name in ("mlflow", "torch", "transformers", "peft", "safetensors"):
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")  # "2.5.1+cpu": the local tag is no pip pin
        except PackageNotFoundError:
            out.append(name)
    return out


def build_model_dir(adapter_dir: Path, base_dir: Path, out: Path, base_name: str, system_prompt: str | None,
                    max_new_tokens: int = 64, bundle_limit_mb: float = BUNDLE_LIMIT_MB) -> Path:
    """An MLflow model folder (pyfunc, models from code) that is also the adapter folder: `out`, which
    must not exist. The base is bundled when it is at most `bundle_limit_mb`, else referenced by path."""
    from mlflow.exceptions import MlflowException

    bundle = _size_mb(base_dir) <= bundle_limit_mb
    config = {"base_model": base_name, "base_model_path": None if bundle else str(base_dir.resolve()),
              "system_prompt": system_prompt, "max_new_tokens": max_new_tokens}
    mlflow.pyfunc.save_model(str(out), python_model=str(Path(__file__).resolve()), model_config=config,
                             artifacts={"base_model": str(base_dir)} if bundle else None,
                             signature=signature(max_new_tokens),
                             input_example=pd.DataFrame(INPUT_EXAMPLE), pip_requirements=_requirements())
    for f in adapter_dir.iterdir():
        target = out / f.name
        if target.exists():
            raise MlflowException(f"adapter file {f.name} collides with the MLflow model's own {target}")
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, target)
    return out


mlflow.models.set_model(AdapterModel())
