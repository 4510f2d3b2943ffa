"""A tiny random Llama with a real BPE tokenizer, for tests and benchmarks (nothing downloaded).

The tokenizer is trained on the given texts (the demo data by default) with ChatML special
tokens and a ChatML chat template; the model is a 2-layer LlamaConfig with random weights.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable
from pathlib import Path

import yaml

DEMO_DATA = Path(__file__).parent / "demo" / "data"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def demo_texts() -> list[str]:
    out = []
    for f in sorted(DEMO_DATA.rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            out += [v for k, v in r.items() if k in ("prompt", "response", "chosen", "rejected", "reference")]
    return out


def build_tiny_model(out: Path, texts: Iterable[str] | None = None, hidden: int = 64, layers: int = 2,
                     vocab: int = 512, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(texts) if texts is not None else demo_texts(),
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    """A free TCP port on loopback (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run_config(tmp: Path, model_dir: Path, **overrides) -> Path:
    """A run config over a slice of the demo data for the tiny model; returns its path."""
    data = tmp / "data"
    (data / "eval").mkdir(parents=True, exist_ok=True)
    for src, dst, n in (("train/tickets.jsonl", "tickets.jsonl", 24), ("train/general.jsonl", "general.jsonl", 12),
                        ("preferences.jsonl", "prefs.jsonl", 12), ("eval/tickets.jsonl", "eval/tickets.jsonl", 8),
                        ("eval/general.jsonl", "eval/general.jsonl", 8), ("canary_traffic.jsonl", "traffic.jsonl", 12)):
        lines = (DEMO_DATA / src).read_text().splitlines()[:n]
        (data / dst).write_text("\n".join(lines) + "\n")
    cfg = {
        "name": "tiny",
        "state_dir": str(tmp / "state"),
        "base_model": {"path": str(model_dir), "name": "tiny-llama"},
        "data": {"sources": [{"path": "data/tickets.jsonl"}, {"path": "data/general.jsonl"},
                             {"path": "data/prefs.jsonl", "kind": "preference"}],
                 "eval": [{"path": "data/eval"}]},
        "train": {"nproc_per_node": 2, "deepspeed": "zero3", "lora": {"r": 4, "alpha": 8},
                  "sft": {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1,
                          "max_length": 128},
                  "dpo": {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1,
                          "max_length": 128}},
        "evaluate": {"slices": {"ticket_routing": {"task": "classification",
                                                   "labels": ["billing", "shipping", "account", "technical"]},
                                "general_qa": {"task": "generation"}},
                     "max_new_tokens": 4, "batch_size": 8,
                     "gates": [{"metric": "nll", "slice": "ticket_routing", "max_regression": 100.0}]},
        "registry": {"model_name": "tiny-model", "experiment": "tiny"},
        "deploy": {"gateway_url": f"http://127.0.0.1:{free_port()}",
                   "canary": {"traffic_percent": 50, "requests": 12, "traffic_file": "data/traffic.jsonl",
                              "max_new_tokens": 4,
                              # p95 of ~6 millisecond requests is scheduler noise, not a signal
                              "max_p95_latency_ratio": 20.0}},
    }
    for dotted, value in overrides.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tiny_training_files(out: Path, model_dir: Path, n_sft: int = 48, n_pref: int = 24) -> tuple[Path, Path]:
    """`sft.jsonl` (prompt/completion) and `preference.jsonl` (prompt/chosen/rejected) from the demo data,
    chat-formatted with the model's template as ingest writes them, for training tests and benchmarks
    that skip the data stages."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eot = "<|im_end|>\n"

    def prompt(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                       tokenize=False)

    rows = []
    for src in ("train/tickets.jsonl", "train/general.jsonl"):
        rows += [json.loads(line) for line in (DEMO_DATA / src).read_text().splitlines() if line.strip()]
    rows = rows[::max(1, len(rows) // n_sft)][:n_sft]
    prefs = [json.loads(line) for line in (DEMO_DATA / "preferences.jsonl").read_text().splitlines()
             if line.strip()][:n_pref]
    out.mkdir(parents=True, exist_ok=True)
    sft, pref = out / "sft.jsonl", out / "preference.jsonl"
    sft.write_text("".join(json.dumps({"prompt": prompt(r["prompt"]), "completion": r["response"] + eot}) + "\n"
                           for r in rows))
    pref.write_text("".join(json.dumps({"prompt": prompt(r["prompt"]), "chosen": r["chosen"] + eot,
                                        "rejected": r["rejected"] + eot}) + "\n" for r in prefs))
    return sft, pref


def build_random_adapter(model_dir: Path, out: Path, seed: int, alpha: int = 256) -> Path:
    """A real LoRA adapter with random (non-zero) weights: a distinct 'version' of the tiny model
    whose answers differ from the base, without training (serving and rollout tests)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), LoraConfig(
        r=8, lora_alpha=alpha, init_lora_weights=False, target_modules=["q_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM"))
    model.save_pretrained(str(out))
    return out
