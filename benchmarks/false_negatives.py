"""How many near-duplicate passages a WordNet row meets among its negatives, by bank size.

Training masks a column whose passage text equals the row's positive (mask_false_negatives); a
passage that shares a lemma with the positive but not its whole text (another sense of the same
word: "bank (noun)" and "bank, cant, camber (noun)") stays a negative. Counts, over the training
pairs of the embedded WordNet extract, the expected number of such columns in a row of C random
other pairs' passages: C x (pairs sharing a lemma with the positive, other text) / (pairs - 1).

    python -m benchmarks.false_negatives      # seconds, no model; writes results/false_negatives/false_negatives_wordnet.json
"""
from __future__ import annotations

import json
from collections import defaultdict

from benchmarks.harness import write_result

COLUMNS = {"N_mem = N_total = 128": 8 + 128, "N_mem = 512": 8 + 512, "full batch 128": 128}


def lemmas(passage: str) -> set:
    words, pos = passage.rsplit(" (", 1)
    return {(word.strip(), pos) for word in words.split(",")}


def main():
    from hf_contaccum.data.sample import load_wordnet_sample

    train = load_wordnet_sample(max_eval_queries=500, max_corpus=3000)[0]
    ids = train["positive_id"]
    lemmas_of = [lemmas(passage) for passage in train["positive"]]
    pairs_with = defaultdict(set)
    for i, pair_lemmas in enumerate(lemmas_of):
        for lemma in pair_lemmas:
            pairs_with[lemma].add(i)
    related = duplicates = 0  # over every pair: other pairs sharing a lemma with it, with another text / the same
    for i, pair_lemmas in enumerate(lemmas_of):
        sharing = set().union(*(pairs_with[lemma] for lemma in pair_lemmas)) - {i}
        same = sum(ids[j] == ids[i] for j in sharing)
        duplicates, related = duplicates + same, related + len(sharing) - same
    n = len(ids)
    per_column = related / n / (n - 1)
    result = {"pairs": n, "share a lemma, other text (per other pair)": per_column,
              "same text, masked (per other pair)": duplicates / n / (n - 1),
              "expected unmasked near-duplicates per row": {name: c * per_column for name, c in COLUMNS.items()}}
    print(json.dumps(result, indent=1))
    print("wrote", write_result(result, None, "false_negatives/false_negatives_wordnet.json"))


if __name__ == "__main__":
    main()
