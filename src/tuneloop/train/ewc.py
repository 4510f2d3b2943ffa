"""Elastic weight consolidation (EWC) toward the champion's LoRA adapter, as an SFT training option.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 114(13):3521-3526,
2017 (https://doi.org/10.1073/pnas.1611835114). Training the new data with loss L_new, EWC adds

    L(theta) = L_new(theta) + lambda/2 * sum_i F_i * (theta_i - theta*_i)^2

where theta* are the parameters after the old task (here: the champion's LoRA adapter, which SFT
continues: `train.sft.init: champion`), and F is the diagonal of the Fisher information of the old
task at theta*, estimated as the mean squared gradient of the log-likelihood over N of the champion's
training records (the "empirical Fisher": the gradient of the log-likelihood of the record's own
answer):

    F_i = 1/N * sum_n ( d/dtheta_i  log p(y_n | x_n; theta*) )^2

with log p the mean log-probability of the answer's tokens (the same per-token scale as the SFT
loss, so lambda does not depend on answer length). Only the LoRA parameters are trainable, so theta,
theta* and F are LoRA-sized. Config: `train.sft.ewc.lambda_` (0 turns it off) and
`train.sft.ewc.fisher_samples` (N).

The Fisher is estimated once, in one process, before training (`prepare_anchor`): it writes an
anchor folder = the champion's adapter files + `fisher.safetensors` (same keys as the adapter's
`adapter_model.safetensors`) + `ewc.json`. The SFT worker gets that folder as its init adapter
(JobSpec.init_adapter_dir), starts from it and adds the penalty (`EWCPenalty`, used by the trainer in
train/sft.py).

Under DeepSpeed ZeRO-3 each parameter is partitioned over the W ranks. Each rank keeps theta* and F
only for its own index range of every parameter (the range ZeRO-3's partition of that rank covers:
[r*ceil(n/W), (r+1)*ceil(n/W)) of the flattened parameter), gathers the LoRA parameters for the
penalty (one coalesced all-gather, `deepspeed.zero.GatheredParameters`; LoRA parameters are small)
and computes its local penalty P_r over its range only, so that sum_r P_r is the full penalty. It
adds W * P_r to its loss: the gradient of P_r is zero outside rank r's range, ZeRO reduce-scatters
the gradients and averages them over the W ranks, so every partition receives exactly the gradient
of the full penalty, (1/W) * sum_r W * grad P_r = grad sum_r P_r. The logged `ewc_penalty` is the
all-reduced sum_r P_r. Without DeepSpeed (or one process) W = 1 and the range is the whole parameter.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("tuneloop.train.ewc")

FISHER_FILE = "fisher.safetensors"
ANCHOR_INFO = "ewc.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FISHER_SEED = "tuneloop-ewc-fisher"


def saved_key(param_name: str, adapter_name: str = "default") -> str:
    """A PeftModel parameter name -> its key in adapter_model.safetensors (peft drops the adapter's name)."""
    return param_name.replace(f".{adapter_name}.", ".")


def local_range(numel: int, rank: int, world: int) -> tuple[int, int]:
    """The index range [lo, hi) of a flattened parameter of `numel` values that rank `rank` of `world` owns
    (ZeRO-3's partition: ceil(numel / world) values per rank, the last one shorter or empty)."""
    part = math.ceil(numel / world) if world > 0 else numel
    lo = min(rank * part, numel)
    return lo, min(lo + part, numel)


def local_penalty(theta: Any, anchor: Any, fisher: Any, lo: int, hi: int) -> Any:
    """sum_{i in [lo, hi)} F_i * (theta_i - theta*_i)^2 for one parameter (anchor and fisher: that range only)."""
    return (fisher * (theta.reshape(-1)[lo:hi].to(anchor.dtype) - anchor) ** 2).sum()


def _key(rid: Any) -> str:
    return hashlib.sha256(f"{FISHER_SEED}\0{rid}".encode()).hexdigest()


def fisher_records(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The n records the Fisher is averaged over: the smallest hashes of their ids (the same on every run)."""
    usable = [r for r in records if r.get("prompt") and r.get("completion")]
    return sorted(usable, key=lambda r: _key(r.get("id")))[:n]


def estimate_fisher(base_dir: str | Path, adapter_dir: str | Path, records: list[dict[str, Any]],
                    max_length: int = 256) -> tuple[dict[str, Any], dict[str, Any]]:
    """Diagonal empirical Fisher of the adapter's trainable (LoRA) parameters on `records` (chat-formatted
    `prompt` / `completion`, as ingest writes sft.jsonl): the mean over records of the squared gradient of
    the mean log-probability of the completion's tokens. Returns (fisher by adapter key, statistics)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not records:
        raise ValueError("EWC: no records to estimate the Fisher information on")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    model.eval()  # no dropout: the gradient of the model as it is
    params = {saved_key(n): p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    used = 0
    for r in records:
        p_ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c_ids = tok(r["completion"], add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:max_length]
        labels = ([-100] * len(p_ids) + c_ids)[:max_length]
        if all(x == -100 for x in labels[1:]):
            continue  # the answer was cut off entirely
        model.zero_grad(set_to_none=True)
        out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
        out.loss.backward()  # loss = -(mean log p of the answer tokens): the same squared gradient
        for k, p in params.items():
            if p.grad is not None:
                fisher[k] += p.grad.detach().float() ** 2
        used += 1
    if used == 0:
        raise ValueError("EWC: every record's answer was cut off by max_length; no Fisher estimate")
    fisher = {k: (v / used).cpu().contiguous() for k, v in fisher.items()}
    flat = torch.cat([v.reshape(-1) for v in fisher.values()])
    stats = {"records": used, "parameters": len(fisher), "values": int(flat.numel()),
             "mean": float(flat.mean()), "max": float(flat.max()), "median": float(flat.median())}
    del model
    return fisher, stats


def prepare_anchor(base_dir: str | Path, champion_adapter: str | Path, champion_sft: str | Path, out: str | Path,
                   samples: int = 64, max_length: int = 256) -> Path:
    """The folder the EWC-trained SFT starts from: the champion's adapter files, its Fisher estimate
    (`fisher.safetensors`) on `samples` records of the champion's training data (`champion_sft`, ingest's
    sft.jsonl) and `ewc.json` (what was estimated on what). Pass it as the SFT JobSpec's init_adapter_dir."""
    from safetensors.torch import save_file

    from tuneloop.jsonl import read_jsonl

    out = Path(out)
    champion_adapter = Path(champion_adapter)
    if not (champion_adapter / ADAPTER_WEIGHTS).exists():
        raise FileNotFoundError(f"EWC: {champion_adapter} has no {ADAPTER_WEIGHTS} (not a LoRA adapter folder)")
    records = fisher_records(read_jsonl(Path(champion_sft)), samples)
    fisher, stats = estimate_fisher(base_dir, champion_adapter, records, max_length)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(champion_adapter, tmp)
    save_file(fisher, str(tmp / FISHER_FILE))
    (tmp / ANCHOR_INFO).write_text(json.dumps({
        "champion_adapter": str(champion_adapter), "champion_data": str(champion_sft), "fisher": stats,
        "record_ids": [r.get("id") for r in records],
        "method": "diagonal empirical Fisher: mean over records of the squared gradient of the mean answer-token "
                  "log-probability (Kirkpatrick et al. 2017)"}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("EWC anchor %s: Fisher over %d records, mean %.3g, max %.3g", out, stats["records"], stats["mean"],
             stats["max"])
    return out


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EWCPenalty:
    """lambda/2 * sum_i F_i (theta_i - theta*_i)^2 over a model's trainable parameters, this rank's share.

    Build it once the model's parameters are final (under ZeRO-3: after the DeepSpeed engine exists, so
    every LoRA parameter is a partitioned ZeRO parameter). Calling it returns (term, local): `term` = W x
    the local penalty, to add to the loss (see the module docstring for why W), and `local` (detached),
    whose all-reduced sum is the full penalty."""

    def __init__(self, model: Any, anchor_dir: str | Path, lambda_: float, adapter_name: str = "default") -> None:
        from safetensors.torch import load_file

        anchor_dir = Path(anchor_dir)
        if not (anchor_dir / FISHER_FILE).exists():
            raise FileNotFoundError(f"train.sft.ewc.lambda_ > 0 needs the Fisher estimate {FISHER_FILE} in the init "
                                    f"adapter folder {anchor_dir} (tuneloop.train.ewc.prepare_anchor writes it)")
        theta = load_file(str(anchor_dir / ADAPTER_WEIGHTS))
        fisher = load_file(str(anchor_dir / FISHER_FILE))
        self.lambda_ = float(lambda_)
        self.rank, self.world = _world()
        self.terms: list[tuple[Any, int, int, Any, Any]] = []
        missing = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            key = saved_key(name, adapter_name)
            if key not in theta or key not in fisher:
                missing.append(name)
                continue
            numel = int(getattr(p, "ds_numel", p.numel()))
            if theta[key].numel() != numel:
                raise ValueError(f"EWC: {name} has {numel} values, the anchor's {key} {theta[key].numel()}")
            lo, hi = local_range(numel, self.rank, self.world)
            self.terms.append((p, lo, hi, theta[key].reshape(-1)[lo:hi].float().clone(),
                               fisher[key].reshape(-1)[lo:hi].float().clone()))
        if missing:
            raise ValueError(f"EWC: {len(missing)} trainable parameters have no anchor value, e.g. {missing[0]}: "
                             "SFT must start from the anchor adapter (train.sft.init: champion)")
        if not self.terms:
            raise ValueError("EWC: the model has no trainable parameters to hold near the champion's")
        self.partitioned = sum(1 for t in self.terms if hasattr(t[0], "ds_id"))
        self.local_values = sum(hi - lo for _, lo, hi, _, _ in self.terms)
        self.total_values = sum(int(getattr(t[0], "ds_numel", t[0].numel())) for t in self.terms)

    def _gathered(self) -> Any:
        if not self.partitioned:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters([t[0] for t in self.terms], modifier_rank=None)

    def __call__(self) -> tuple[Any, Any]:
        import torch

        with self._gathered():
            total = None
            for i, (p, lo, hi, anchor, fisher) in enumerate(self.terms):
                if anchor.device != p.device:
                    anchor, fisher = anchor.to(p.device), fisher.to(p.device)
                    self.terms[i] = (p, lo, hi, anchor, fisher)
                if hi <= lo:
                    continue
                term = local_penalty(p, anchor, fisher, lo, hi)
                total = term if total is None else total + term
        if total is None:  # this rank owns no values (more ranks than values)
            total = torch.zeros((), device=self.terms[0][0].device)
        local = self.lambda_ / 2 * total
        return local * self.world, local.detach()

    def describe(self) -> dict[str, Any]:
        return {"lambda": self.lambda_, "parameters": len(self.terms), "partitioned_parameters": self.partitioned,
                "world_size": self.world, "rank": self.rank, "local_values": self.local_values,
                "total_values": self.total_values}
