"""Base model materialisation and loading models for scoring and serving.

`materialize_base_model` turns the configured base model into a save_pretrained folder in
the state directory once (GGUF files are dequantised and converted; the folder is keyed by a
hash of the source), and every later stage reads that folder by path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from tuneloop.config import BaseModelConfig
from tuneloop.pkgdata import PREFIX, resolve

log = logging.getLogger("tuneloop.models")


def source_dir(cfg: BaseModelConfig) -> Path | None:
    if cfg.path.startswith(PREFIX):
        return resolve(cfg.path, "base_model.path")
    p = Path(cfg.path)
    return p if p.exists() else None


def materialize_base_model(cfg: BaseModelConfig, state_dir: Path) -> Path:
    """Return a local save_pretrained folder for the base model, converting it once if needed."""
    src = source_dir(cfg)
    if src is None:
        raise FileNotFoundError(f"base_model.path: {cfg.path} is not a local folder or installed package "
                                "(models are not downloaded at run time; save it to a folder first)")
    if cfg.gguf_file is None:
        if not (src / "config.json").exists():
            raise FileNotFoundError(f"base_model.path: {src} has no config.json (not a save_pretrained folder)")
        return src
    gguf = src / cfg.gguf_file
    if not gguf.exists():
        raise FileNotFoundError(f"base_model.gguf_file: {gguf} does not exist")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = state_dir / "models" / f"{cfg.name}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to a save_pretrained folder (once; cached in %s)", gguf.name, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), gguf_file=cfg.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=cfg.gguf_file, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a gguf quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)  # a half-written folder is never picked up
    return out


def load_causal_lm(base_dir: str | Path, adapter_dir: str | Path | None = None) -> tuple[Any, Any]:
    """Base model (+ LoRA adapter) in eval mode with its tokenizer, left-padded for batching."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.data.formatting import ensure_pad_token

    tok = ensure_pad_token(AutoTokenizer.from_pretrained(str(base_dir)))
    tok.padding_side = "left"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model = model.merge_and_unload()  # one plain model: faster scoring and generation
    if torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    return model, tok
