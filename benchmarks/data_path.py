"""The data path's own cost: checking the training data before training, and the collator.

  check   validation.check_dataset on 1M synthetic rows x 4 text columns, as stored and shuffled
          (an index mapping), and on 200k rows as a list of dicts
  collate ContrastiveCollator on WordNet pairs, on the fly vs tokenised once (tokenize_once), with
          the offline MiniLM tokenizer: short pairs (64/32 tokens) and long passages (256 tokens,
          one hard negative); plus the one-off cost of tokenising 4,000 rows

    python -m benchmarks.data_path          # ~1 min on 2 CPU cores
"""
from __future__ import annotations

import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def timed(fn, repeats=3):
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def check_figures():
    from datasets import Dataset

    from hf_contaccum.data.validation import check_dataset

    n = 1_000_000
    ds = Dataset.from_dict({"query": [f"query number {i}" for i in range(n)],
                            "positive": [f"a passage text {i}" for i in range(n)],
                            "negative": [f"neg {i}" for i in range(n)], "negative_1": [f"neg b {i}" for i in range(n)]})
    rows, shuffled = ds.select(range(200_000)).to_list(), ds.shuffle(seed=0)
    return {"1M rows, 4 text columns (s)": timed(lambda: check_dataset(ds)),
            "1M rows shuffled (s)": timed(lambda: check_dataset(shuffled)),
            "200k rows as a list of dicts (s)": timed(lambda: check_dataset(rows))}


def collate_figures():
    from transformers import AutoTokenizer

    from hf_contaccum.data.collator import ContrastiveCollator, tokenize_once
    from hf_contaccum.data.sample import load_wordnet_sample
    from hf_contaccum.quickstart import default_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
    train, *_ = load_wordnet_sample(max_train=4000)
    long = train.map(lambda r: {"positive": (r["positive"] + " : " + r["query"] + " ") * 8,
                                "negative": (r["query"] + " ") * 10})
    out = {}
    for name, ds, lengths in (("short pairs", train, (64, 32)), ("256-token passages + 1 hard negative", long,
                                                                   (64, 256))):
        collator = ContrastiveCollator(tokenizer, *lengths)
        start = time.perf_counter()
        encoded = tokenize_once(ds, collator)
        once = time.perf_counter() - start
        raw, pre = list(ds.select(range(800))), list(encoded.select(range(800)))

        def per_batch(rows, collator=collator):
            return timed(lambda: [collator(rows[i:i + 8]) for i in range(0, 800, 8)]) / 100 * 1000

        out[name] = {"on the fly (ms per batch of 8)": per_batch(raw), "tokenised once (ms per batch of 8)":
                     per_batch(pre), "tokenising 4,000 rows once (s)": once}
    return out


def main():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"check": check_figures(), "collate": collate_figures()}
    print(json.dumps(result, indent=1))
    with open(os.path.join(HERE, "results", "performance", "data_path.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
