"""Stages 4-5: SFT, then the alignment path the run config chooses (`train.alignment`): DPO, or a reward model
and online RL against it (reward+rl), or none - all through the training launchers (local torchrun, TrainJob,
PyTorchJob)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from tuneloop.config import RunConfig
from tuneloop.registry import Registry
from tuneloop.stages.common import base_model_dir, timed_stage

log = logging.getLogger("tuneloop.stages")


# 4, 5 ----------------------------------------------------------------------------------------
def _train(cfg: RunConfig, parent_id: str, stage: str, data: Path, out: Path,
           init_adapter: Path | None, name: str | None = None) -> dict[str, Any]:
    """`name`: a repair attempt's stage run name; its checkpoints then live apart from the pipeline's own."""
    from tuneloop.evaluate.model_card import num
    from tuneloop.train.launch import build_spec, launch

    reg = Registry(cfg)
    section = cfg.train.sft if stage == "sft" else cfg.train.dpo

    def run(run_id: str) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        off = stage == "dpo" and cfg.train.alignment != "dpo"
        if off or not section.enabled or not data.read_text().strip():
            reason = (f"train.alignment is {cfg.train.alignment}" if off else
                      "disabled" if not section.enabled else "no training records")
            if init_adapter is None:
                raise RuntimeError(f"{stage}: {reason} and there is no adapter to pass on")
            shutil.copytree(init_adapter, out / "adapter", dirs_exist_ok=True)
            return {"outcome": f"skipped ({reason}); adapter passed through", "skipped": True}
        reg.log_params(run_id, {f"{stage}.{k}": v for k, v in section.model_dump().items()})
        reg.log_params(run_id, {"deepspeed": cfg.train.deepspeed, "nproc_per_node": cfg.train.nproc_per_node,
                                "backend": cfg.train.backend, "num_nodes": cfg.train.num_nodes,
                                "method": cfg.train.method,
                                **{f"lora.{k}": v for k, v in cfg.train.lora.model_dump().items()}})
        checkpoints_of = parent_id if name is None else f"{parent_id}-{name.replace('/', '-')}"
        spec = build_spec(cfg, stage, base_model_dir(cfg), data, out, init_adapter,
                          {"tracking_uri": reg.uri, "run_id": run_id}, pipeline_run=checkpoints_of)
        result = launch(cfg, spec, checkpoints_of)  # a rerun of this pipeline run resumes from its checkpoints
        reg.log_metrics(run_id, {k: v for k, v in result.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)})
        outcome = (f"{result['steps']} steps, loss {num(result['first_loss'])} -> {num(result['final_loss'])}, "
                   f"{result['tokens_per_s']:.0f} tokens/s")
        resumed = result.get("resumed_from_step")
        return {**result, "adapter": str(out / "adapter"), "outcome": outcome,
                "description": f"**{stage}: {outcome}** - {cfg.train.deepspeed}, {cfg.train.nproc_per_node} processes "
                               f"per node x {cfg.train.num_nodes} nodes ({cfg.train.backend})"
                               + (f"; resumed from the checkpoint at step {resumed}" if resumed else "")
                               + f"; the adapter goes on to {'dpo' if stage == 'sft' else 'evaluate'}."}

    return timed_stage(reg, parent_id, name or stage, run)


def sft_stage(cfg: RunConfig, parent_id: str, dataset: Path, out: Path, name: str | None = None) -> dict[str, Any]:
    return _train(cfg, parent_id, "sft", sft_records(cfg, dataset, out), out, sft_init_adapter(cfg, out), name)


def sft_records(cfg: RunConfig, dataset: Path, out: Path) -> Path:
    """The SFT stage's records: ingest's DATASET/sft.jsonl, or with train.sft.safety_demos, OUT/sft_records.jsonl:
    those records and the refusal demonstrations (slice `safety`)."""
    from tuneloop.data.safety_pairs import write_jsonl
    from tuneloop.jsonl import read_jsonl

    src, n = dataset / "sft.jsonl", cfg.train.sft.safety_demos
    if n == 0:
        return src
    pairs = [r for r in _safety_pairs(cfg, None) if r["split"] == "train"]
    if len(pairs) < n:
        raise ValueError(f"train.sft.safety_demos: {n} asked, but train.reward.safety.prompt_files give only "
                         f"{len(pairs)} prompts on the train side; lower it or add prompt files")
    demos = [{"id": r["id"], "slice": r["slice"], "source": r["source"], "user_text": r["user_text"],
              "response": r["chosen"], "prompt": r["prompt"], "completion": r["chosen"]} for r in pairs[:n]]
    log.info("sft: %d refusal demonstrations added to the records (train.sft.safety_demos)", n)
    return write_jsonl(list(read_jsonl(src)) + demos, out / "sft_records.jsonl")


def dpo_stage(cfg: RunConfig, parent_id: str, dataset: Path, sft_out: Path, out: Path,
              name: str | None = None) -> dict[str, Any]:
    return _train(cfg, parent_id, "dpo", dataset / "preference.jsonl", out, sft_out / "adapter", name)


def sft_init_adapter(cfg: RunConfig, out: Path) -> Path | None:
    """train.sft.init: champion -> SFT continues the champion's adapter; with train.sft.ewc.lambda_ > 0, the
    EWC anchor (that adapter + its Fisher on the champion's training data: train/ewc.py). None: a fresh one."""
    if cfg.train.sft.init != "champion" or cfg.train.method == "full":
        return None
    from tuneloop.data.replay import champion_training_data
    from tuneloop.train.ewc import prepare_anchor

    reg = Registry(cfg)
    champ = reg.alias_version("champion")
    if champ is None:
        log.info("train.sft.init: champion, but there is no champion yet: SFT trains a fresh adapter")
        return None
    adapter = reg.download_adapter(champ, cfg.state_path / "serving")
    if cfg.train.sft.ewc.lambda_ <= 0:
        return adapter
    data = champion_training_data(reg, cfg.state_path / "champion-data")
    if data is None:
        raise RuntimeError(f"train.sft.ewc.lambda_: champion v{champ.version}'s training data is not recorded, so "
                           "its Fisher cannot be estimated; set it to 0 or use another mitigation")
    return prepare_anchor(base_model_dir(cfg), adapter, data.sft, out / "ewc-anchor",
                          cfg.train.sft.ewc.fisher_samples, cfg.train.sft.max_length)


# 5b: alignment reward+rl -------------------------------------------------------------------------------------
class RewardGateFailed(RuntimeError):
    """The reward model ranks held-out pairs below a configured floor: it is neither registered nor used."""


def reward_pairs(cfg: RunConfig, dataset: Path, out: Path) -> Path:
    """OUT/pairs.jsonl: the run's preference pairs (ingest's preference.jsonl), the safety pairs and the benign
    pairs (requests of ingest's sft.jsonl, train.reward.safety.benign_pairs), each with `split` train or eval
    (held out by a hash of the prompt, train.reward.eval_share)."""
    from tuneloop.data.safety_pairs import benign_pairs, held_out, write_jsonl
    from tuneloop.jsonl import read_jsonl

    rw = cfg.train.reward
    src = dataset / "preference.jsonl"
    rows = [{**r, "split": "eval" if held_out(r.get("user_text") or r["prompt"], rw.eval_share) else "train"}
            for r in (read_jsonl(src) if src.exists() else [])]
    if rw.safety.enabled:
        fmt = _formatter(cfg)
        rows += _safety_pairs(cfg, rw.safety.max_pairs, fmt)
        n = rw.safety.benign_pairs
        if n:
            records = list(read_jsonl(dataset / "sft.jsonl"))
            if len(records) < n:
                raise ValueError(f"train.reward.safety.benign_pairs: {n} asked, but the run has only {len(records)} "
                                 "SFT records to take benign requests from; lower it or add sft data")
            rows += benign_pairs(records, n, cfg.train.seed, rw.eval_share, fmt.completion)
    return write_jsonl(rows, out / "pairs.jsonl")


def _safety_pairs(cfg: RunConfig, max_pairs: int | None, fmt: Any = None) -> list[dict[str, Any]]:
    """train.reward.safety's pairs rendered with the base model's chat template, at most MAX_PAIRS (None: one per
    prompt), none of them a prompt the red-team evaluation uses (evaluate.safety, as its seeded sample picks them);
    the same seed gives the same prompts in the same order, so the first N are the same at any size."""
    from tuneloop.data.safety_pairs import safety_pairs
    from tuneloop.evaluate.safety import load_prompts

    rw = cfg.train.reward
    fmt = fmt or _formatter(cfg)
    exclude = load_prompts(cfg.evaluate.safety, cfg.evaluate.seed) if cfg.evaluate.safety is not None else None
    return safety_pairs(rw.safety.prompt_files, max_pairs, cfg.train.seed, rw.eval_share, exclude,
                        fmt.user_prompt, fmt.completion)


def _formatter(cfg: RunConfig) -> Any:
    """The base model's chat template, as ingest renders records with it (data/formatting.py)."""
    from transformers import AutoTokenizer

    from tuneloop.data.formatting import ChatFormatter

    return ChatFormatter(AutoTokenizer.from_pretrained(str(base_model_dir(cfg))), cfg.data.system_prompt)


def reward_gate(cfg: RunConfig, ev: dict[str, Any]) -> list[str]:
    """Why the reward model fails its gate (train.reward.gate), one line per rule; empty when it passes."""
    gate, why = cfg.train.reward.gate, []
    acc = ev.get("accuracy")
    if acc is None:
        why.append("no held-out pairs to measure pairwise accuracy on (raise train.reward.eval_share or add pairs)")
    elif acc < gate.min_accuracy:
        why.append(f"held-out pairwise accuracy {acc:.3f} over {ev['pairs']} pairs is below "
                   f"train.reward.gate.min_accuracy {gate.min_accuracy}")
    for name, floor in sorted(gate.min_slice_accuracy.items()):
        s = ev.get("slices", {}).get(name)
        if s is None or s["pairs"] < gate.min_pairs:
            why.append(f"slice {name}: {0 if s is None else s['pairs']} held-out pairs, fewer than "
                       f"train.reward.gate.min_pairs {gate.min_pairs}")
        elif s["accuracy"] < floor:
            why.append(f"slice {name}: held-out pairwise accuracy {s['accuracy']:.3f} over {s['pairs']} pairs is "
                       f"below train.reward.gate.min_slice_accuracy.{name} {floor}")
    return why


def reward_registry(cfg: RunConfig) -> Registry:
    """The registry handle of the reward models: registered model <registry.model_name>-reward."""
    return Registry(cfg, name=f"{cfg.registry.model_name}-reward")


def reward_stage(cfg: RunConfig, parent_id: str, dataset: Path, out: Path) -> dict[str, Any]:
    """Train (or reuse the champion) reward model on preference + safety pairs, gate it on held-out pairwise
    accuracy per slice, register it as <model_name>-reward. Outputs OUT/adapter (LoRA + score head),
    OUT/pairs.jsonl, OUT/reward_eval.json."""
    import json

    from tuneloop.registry import TAG_BASE_MODEL, TAG_DATA_HASH, TAG_GIT_SHA, TAG_PIPELINE_RUN, git_sha
    from tuneloop.train.launch import build_spec, launch

    if cfg.train.alignment != "reward+rl":  # off this run's path: no MLflow run, an empty output
        out.mkdir(parents=True, exist_ok=True)
        (out / "NOT_TRAINED.txt").write_text(f"train.alignment is {cfg.train.alignment}: no reward model\n")
        return {"outcome": f"not on the alignment path ({cfg.train.alignment})", "skipped": True}
    reg, rreg = Registry(cfg), reward_registry(cfg)
    rw = cfg.train.reward

    def run(run_id: str) -> dict[str, Any]:
        out.mkdir(parents=True, exist_ok=True)
        pairs = reward_pairs(cfg, dataset, out)
        rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
        n_train = sum(r["split"] == "train" for r in rows)
        reg.log_params(run_id, {f"reward.{k}": v for k, v in rw.model_dump().items() if k not in ("safety", "gate")})
        reg.log_metrics(run_id, {"reward.pairs_train": n_train, "reward.pairs_eval": len(rows) - n_train,
                                 "reward.safety_pairs": sum(r.get("slice") == "safety" for r in rows)})
        if rw.reuse_champion and (mv := rreg.alias_version("champion")) is not None:
            got = rreg.download_adapter(mv, cfg.state_path / "reward_models")
            shutil.copytree(got, out / "adapter", dirs_exist_ok=True)
            (out / "reward_eval.json").write_text(json.dumps({"reused": str(mv.version)}))
            return {"outcome": f"reused {rreg.name} v{mv.version} @champion", "reused_version": str(mv.version),
                    "adapter": str(out / "adapter"),
                    "description": f"**reward: reused {rreg.name} v{mv.version} @champion** (train.reward."
                                   "reuse_champion); not trained or gated again."}
        if n_train == 0:
            raise RewardGateFailed("reward: no training pairs (no preference pairs and no safety pairs)")
        spec = build_spec(cfg, "reward", base_model_dir(cfg), pairs, out, None,
                          {"tracking_uri": reg.uri, "run_id": run_id}, pipeline_run=parent_id)
        result = launch(cfg, spec, parent_id)
        ev = result.get("reward_eval") or {}
        (out / "reward_eval.json").write_text(json.dumps(ev, indent=2))
        metrics = {"reward.accuracy": ev.get("accuracy"), "reward.mean_margin": ev.get("mean_margin"),
                   "reward.final_loss": result.get("final_loss"), "reward.steps": result.get("steps"),
                   **{f"reward.accuracy.{s}": v["accuracy"] for s, v in ev.get("slices", {}).items()},
                   **{f"reward.pairs.{s}": v["pairs"] for s, v in ev.get("slices", {}).items()}}
        reg.log_metrics(run_id, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        reg.log_artifacts(run_id, out, "reward")
        slices = ", ".join(f"{s} {v['accuracy']:.3f} ({v['pairs']})" for s, v in ev.get("slices", {}).items())
        why = reward_gate(cfg, ev)
        reg.set_tag(run_id, "tuneloop.reward_gate", "failed" if why else "passed")
        if why:
            raise RewardGateFailed("reward gate failed: " + "; ".join(why))
        data_hash = json.loads((dataset / "report.json").read_text()).get("data_hash", "") \
            if (dataset / "report.json").exists() else ""
        tags = {TAG_PIPELINE_RUN: parent_id, TAG_DATA_HASH: data_hash, TAG_GIT_SHA: git_sha(),
                TAG_BASE_MODEL: cfg.base_model.name, "tuneloop.loop": cfg.name, "tuneloop.kind": "reward_model",
                "tuneloop.reward_accuracy": f"{ev['accuracy']:.4f}",
                "tuneloop.pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest()}
        mv = rreg.register(run_id, out / "adapter", tags)
        rreg.set_alias("champion", str(mv.version))  # it passed its gate: later runs may reuse it
        outcome = (f"accuracy {ev['accuracy']:.3f} on {ev['pairs']} held-out pairs ({slices}); "
                   f"{rreg.name} v{mv.version} @champion")
        return {**result, "adapter": str(out / "adapter"), "version": str(mv.version), "outcome": outcome,
                "description": f"**reward: {outcome}** - TRL RewardTrainer, LoRA on a sequence-classification head, "
                               f"{result.get('steps')} steps on {n_train} pairs (preference + safety), loss "
                               f"{result.get('first_loss')} -> {result.get('final_loss')}; gate: overall >= "
                               f"{rw.gate.min_accuracy}, per slice {rw.gate.min_slice_accuracy}."}

    return timed_stage(reg, parent_id, "reward", run)


def rl_stage(cfg: RunConfig, parent_id: str, policy_out: Path, reward_out: Path, out: Path) -> dict[str, Any]:
    """Online RL (train.rl.trainer) from the SFT adapter (POLICY_OUT/adapter: the dpo stage passes it through on
    this path) against the reward model, on the train-split prompts of the reward stage's pairs; a guard breach
    fails the stage with its reason. Outputs OUT/adapter. Off the reward+rl path it passes POLICY_OUT/adapter
    through, without an MLflow run of its own."""
    import json

    from tuneloop.train.launch import build_spec, launch

    if cfg.train.alignment != "reward+rl":
        shutil.copytree(policy_out / "adapter", out / "adapter", dirs_exist_ok=True)
        return {"outcome": f"not on the alignment path ({cfg.train.alignment}); adapter passed through",
                "skipped": True, "adapter": str(out / "adapter")}

    reg = Registry(cfg)
    rl = cfg.train.rl

    def run(run_id: str) -> dict[str, Any]:
        from tuneloop.data.safety_pairs import write_jsonl
        from tuneloop.train.local import GuardStopped

        out.mkdir(parents=True, exist_ok=True)
        rows = [json.loads(line) for line in (reward_out / "pairs.jsonl").read_text().splitlines() if line.strip()]
        prompts = write_jsonl(sorted(({"prompt": p} for p in {r["prompt"] for r in rows if r["split"] == "train"}),
                                     key=lambda r: r["prompt"]), out / "prompts.jsonl")
        reg.log_params(run_id, {f"rl.{k}": v for k, v in rl.model_dump().items() if k != "guards"}
                       | {f"rl.guards.{k}": v for k, v in rl.guards.model_dump().items()})
        spec = build_spec(cfg, "rl", base_model_dir(cfg), prompts, out, policy_out / "adapter",
                          {"tracking_uri": reg.uri, "run_id": run_id}, pipeline_run=parent_id,
                          reward_adapter=reward_out / "adapter")
        try:
            result = launch(cfg, spec, parent_id)
        except GuardStopped as e:
            _log_watch(reg, run_id, out)
            reg.set_tag(run_id, "tuneloop.rl_guard", "stopped")
            reg.log_metrics(run_id, {f"rl.stopped.{k}": v for k, v in e.details.get("last", {}).items()
                                     if isinstance(v, (int, float))})
            raise
        final = result.get("rl_final") or {}
        reg.set_tag(run_id, "tuneloop.rl_guard", "passed")
        reg.log_metrics(run_id, {f"rl.final.{k}": v for k, v in final.items() if isinstance(v, (int, float))})
        _log_watch(reg, run_id, out)
        outcome = (f"{result['steps']} steps, reward {final.get('reward_mean', float('nan')):.3f}, "
                   f"kl {final.get('kl', float('nan')):.4f}, length {final.get('mean_length', float('nan')):.1f}, "
                   f"distinct-2 {final.get('distinct_2', float('nan')):.3f}")
        return {**result, "adapter": str(out / "adapter"), "outcome": outcome,
                "description": f"**rl ({rl.trainer}): {outcome}** - from the SFT adapter against the reward model, "
                               f"beta {rl.beta}, {rl.num_generations} completions per prompt; no guard fired "
                               f"({json.dumps(rl.guards.model_dump())}); the adapter goes on to evaluate."}

    return timed_stage(reg, parent_id, "rl", run)


def _log_watch(reg: Registry, run_id: str, out: Path) -> None:
    """The watched RL metrics of every logging step (rl_watch.json) as the stage run's artifact `rl/`."""
    import tempfile

    f = out / "rl_watch.json"
    if f.exists():
        d = Path(tempfile.mkdtemp())
        shutil.copyfile(f, d / f.name)
        reg.log_artifacts(run_id, d, "rl")
