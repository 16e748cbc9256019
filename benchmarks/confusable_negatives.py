"""How confusable each task's negatives are for the pretrained encoder: a check behind the quality notes.

For a random sample of training pairs it scores every query against every sampled passage with the offline
all-MiniLM-L6-v2 and reports how often another pair's passage scores at least as high as the query's own
positive, and how often it is a near duplicate (cosine > 0.9). Used to test whether Debian's noisy
GradNormRatio comes from near-identical packages (it does not: no pair is a near duplicate, and Debian's
negatives are less confusable than WordNet's).

    python -m benchmarks.confusable_negatives          # ~5 min on 2 CPU cores; Debian needs the apt lists
"""
import json
import os
import random

import torch

from benchmarks.tasks import load_debian_packages
from hf_contaccum import BiEncoder
from hf_contaccum.data.sample import load_wordnet_sample
from hf_contaccum.quickstart import default_encoder_path

SAMPLE = 4000
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "false_negatives", "confusable_negatives.json")


def confusability(model, train, seed=0):
    rows = list(train)
    random.Random(seed).shuffle(rows)
    rows = rows[:SAMPLE]
    with torch.no_grad():
        q = torch.as_tensor(model.encode_queries([r["query"] for r in rows], batch_size=256))
        p = torch.as_tensor(model.encode_passages([r["positive"] for r in rows], batch_size=256))
    scores = q @ p.T
    positive = scores.diag().clone()
    scores.fill_diagonal_(-1.0)
    hardest = scores.max(1).values
    return {"pairs": len(rows), "other_passage_scores_at_least_positive": float((hardest >= positive).float().mean()),
            "other_passage_cosine_above_0.9": float((hardest > 0.9).float().mean()),
            "mean_positive_cosine": float(positive.mean()), "mean_hardest_negative_cosine": float(hardest.mean())}


def main():
    model = BiEncoder.from_encoder(default_encoder_path(), normalize=True).eval()
    results = {"wordnet": confusability(model, load_wordnet_sample()[0]),
               "debian": confusability(model, load_debian_packages()[0])}
    print(json.dumps(results, indent=1))
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
