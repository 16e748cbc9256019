"""one_tower_call: a shared tower's queries and passages in one forward call instead of two.

Same model, same micro-batches, through the Trainer's own training_step (encode, loss, backward, enqueue),
the two settings interleaved round by round (machine drift hits both alike), medians and the paired ratio.
One call halves the tower's kernel launches and pays for the queries padded to the passages' length, so it
wins where a micro-step is launch-bound and loses where it is compute-bound; this measures both ends:

    python -m benchmarks.one_tower_call --encoder tiny      # a 2-layer d-64 BERT: host/launch-bound
    python -m benchmarks.one_tower_call --encoder minilm    # all-MiniLM-L6-v2: compute-bound on a CPU
    python -m benchmarks.one_tower_call --encoder minilm --task code   # short queries, long passages (code)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from benchmarks.harness import device, timed, write_result


def build_model(encoder: str):
    from transformers import BertConfig

    from hf_contaccum import BiEncoder
    from hf_contaccum.quickstart import default_encoder_path

    torch.manual_seed(0)
    if encoder == "minilm":
        return BiEncoder.from_encoder(default_encoder_path(), normalize=True)
    tokenizer = BiEncoder.from_encoder(default_encoder_path()).tokenizer
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128)
    model = BiEncoder.from_encoder_config(config, normalize=True)
    model.tokenizer = tokenizer
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--task", choices=["wordnet", "code"], default="wordnet",
                        help="wordnet: definitions (<= 32 tokens here) for lemmas; code: docstring sentences for "
                             "functions (<= 128 tokens), the padded queries' worst case")
    parser.add_argument("--n_local", type=int, default=8)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--memory_bank_size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (after one warm-up round)")
    parser.add_argument("--query_max_length", type=int, default=32)
    parser.add_argument("--passage_max_length", type=int, default=None, help="default 64 (wordnet), 128 (code)")
    parser.add_argument("--output", default=None,
                        help="default benchmarks/results/performance/one_tower_call_<encoder>[_<task>].json")
    args = parser.parse_args()

    from benchmarks.tasks import load_task
    from hf_contaccum import ContAccumTrainer, ContAccumTrainingArguments

    args.passage_max_length = args.passage_max_length or (128 if args.task == "code" else 64)
    model = build_model(args.encoder).to(device()).train()
    train, *_ = load_task(args.task, 10, 100)
    trainers = {}
    for one_call in (False, True):
        targs = ContAccumTrainingArguments(
            output_dir="/tmp/one_tower_call", per_device_train_batch_size=args.n_local,
            gradient_accumulation_steps=args.k, memory_bank_size=args.memory_bank_size, temperature=0.05,
            query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
            one_tower_call=one_call, tokenize_once=False, report_to="none", use_cpu=device() == "cpu", disable_tqdm=True)
        trainers["one call" if one_call else "two calls"] = ContAccumTrainer(
            model=model, args=targs, train_dataset=train, processing_class=model.tokenizer)
    collate = trainers["two calls"].data_collator
    per_step, times, tokens = args.n_local * args.k, {name: [] for name in trainers}, {}

    def one_step(trainer, batches):
        trainer.current_gradient_accumulation_steps = args.k
        for batch in batches:
            trainer.training_step(model, batch)
        model.zero_grad()

    for r in range(args.rounds + 1):
        first = (r * per_step) % (len(train) - per_step)
        rows = [train[j] for j in range(first, first + per_step)]
        batches = [{k: v.to(device()) for k, v in collate(rows[i:i + args.n_local]).items()}
                   for i in range(0, per_step, args.n_local)]
        tokens.setdefault("two calls", []).append(sum(b["query_input_ids"].numel() + b["passage_input_ids"].numel()
                                                      for b in batches))
        tokens.setdefault("one call", []).append(sum(
            (b["query_input_ids"].shape[0] + b["passage_input_ids"].shape[0])
            * max(b["query_input_ids"].shape[1], b["passage_input_ids"].shape[1]) for b in batches))
        for name in (list(trainers) if r % 2 == 0 else list(reversed(trainers))):  # alternate who goes first
            seconds = timed(lambda trainer=trainers[name], batches=batches: one_step(trainer, batches))
            if r > 0:
                times[name].append(seconds)
        if r > 0:
            print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in trainers))
    med = {n: statistics.median(v) for n, v in times.items()}
    result = {
        "encoder": args.encoder, "task": args.task, "n_local": args.n_local, "k": args.k, "memory_bank_size": args.memory_bank_size,
        "query_max_length": args.query_max_length, "passage_max_length": args.passage_max_length,
        "device": torch.cuda.get_device_name() if device() == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "seconds_per_step": times, "median_seconds_per_step": med,
        "median_paired_ratio_one_over_two": statistics.median(o / t for o, t in zip(times["one call"],
                                                                                    times["two calls"])),
        "tokens_per_step_ratio_one_over_two": sum(tokens["one call"]) / sum(tokens["two calls"]),
    }
    print(json.dumps({k: result[k] for k in ("median_seconds_per_step", "median_paired_ratio_one_over_two",
                                             "tokens_per_step_ratio_one_over_two")}, indent=1))
    write_result(result, args.output,
                 f"performance/one_tower_call_{args.encoder}{'' if args.task == 'wordnet' else '_' + args.task}.json")


if __name__ == "__main__":
    main()
