"""Subclassing ContAccumTrainer in your own script: train embeddings that are used
truncated to their first `dim` dimensions (cheaper index, Matryoshka-style use).

The only hook needed is `embed`, which maps {side: tokenised texts} to {side: embeddings}
("query", "passage") in one forward call; the loss, the bank (now `dim` wide),
accumulation, distributed gathering and GradCache chunks all work on what it returns.

    python examples/subclass_truncated_embeddings.py --dim 128 --max_steps 20
"""
from __future__ import annotations

import argparse

from hf_contaccum import BiEncoder, ContAccumTrainer, ContAccumTrainingArguments


class TruncatedEmbeddingTrainer(ContAccumTrainer):
    def __init__(self, *args, dim: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.dim = dim

    def embed(self, model, features):
        return {side: vectors[:, : self.dim] for side, vectors in super().embed(model, features).items()}


def main(argv=None):
    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128, help="dimensions kept")
    parser.add_argument("--max_steps", type=int, default=20)
    parser.add_argument("--output_dir", default="truncated_out")
    args = parser.parse_args(argv)
    model = BiEncoder.from_encoder(default_encoder_path())
    train, *_ = load_wordnet_sample()
    training_args = ContAccumTrainingArguments(output_dir=args.output_dir, max_steps=args.max_steps,
                                               per_device_train_batch_size=8, gradient_accumulation_steps=4,
                                               memory_bank_size=128, similarity="cos", temperature=0.05,
                                               report_to="none", save_strategy="no")
    trainer = TruncatedEmbeddingTrainer(model=model, args=training_args, train_dataset=train,
                                        processing_class=model.tokenizer, dim=args.dim)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
