"""A second real retrieval task, built offline from Debian's package index: package search.

A query is a package's one-line synopsis ("Real-time strategy game of ancient warfare");
its relevant passage is the first paragraph of the package's long description. Packages
whose first paragraph is not unique (families such as foo, foo-data, foo-doc) are
dropped, so a passage is one package; a synopsis shared by up to three packages makes all
of them relevant, more generic ones ("transitional package") are dropped. 10 % of the
synopses (by a hash) are the test split; training never sees them.

The data is not shipped (each description is its package's own text): it is read from the
apt lists of a Debian or Ubuntu machine, after

    apt-get -o Acquire::Languages=en update

which downloads the English descriptions (the *_i18n_Translation-en* files).
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import lzma
import subprocess

LISTS = "/var/lib/apt/lists"


def _read(path):
    if path.endswith(".lz4"):  # apt's own helper decompresses lz4; no extra Python package needed
        return subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], check=True,
                              capture_output=True).stdout.decode("utf-8", "replace")
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path[path.rfind("."):], open)
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def _descriptions(lists_dir):
    paths = sorted(p for p in glob.glob(f"{lists_dir}/*_main_i18n_Translation-en*") if not p.endswith(".diff"))
    if not paths:
        raise FileNotFoundError(
            f"no *_main_i18n_Translation-en* file in {lists_dir}: run `apt-get -o Acquire::Languages=en update` "
            "on a Debian or Ubuntu machine first (the package search task is built from it)")
    packages = {}
    for path in paths:
        for stanza in _read(path).split("\n\n"):
            fields, name, lines = {}, None, []
            for line in stanza.splitlines():
                if line.startswith("Package:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Description-en:"):
                    fields["synopsis"] = line.split(":", 1)[1].strip()
                elif line.startswith(" ") and "synopsis" in fields:
                    lines.append(line[1:])
            if name and fields.get("synopsis") and lines:
                paragraph = " ".join(l.strip() for l in _first_paragraph(lines))
                if len(paragraph) >= 40:
                    packages[name] = (fields["synopsis"], paragraph)
    return packages


def _first_paragraph(lines):
    out = []
    for line in lines:
        if line.strip() == ".":
            break
        out.append(line)
    return out


def _hash(text):
    return int(hashlib.sha1(text.encode()).hexdigest(), 16)


def _is_test(synopsis):  # split by synopsis, so that a query's relevant packages are all on one side
    return _hash(synopsis) % 10 == 0


def load_debian_packages(max_eval_queries=None, max_corpus=None, lists_dir=LISTS):
    """Returns (train Dataset[query, positive, positive_id], eval queries, corpus, qrels), like
    hf_contaccum.sample_data.load_wordnet_sample."""
    from datasets import Dataset

    packages = _descriptions(lists_dir)
    by_paragraph, by_synopsis = {}, {}
    for name, (synopsis, paragraph) in packages.items():
        by_paragraph.setdefault(paragraph, []).append(name)
    unique = sorted((names[0] for names in by_paragraph.values() if len(names) == 1), key=_hash)  # hash order: no alphabetical bias
    for name in unique:
        by_synopsis.setdefault(packages[name][0], []).append(name)
    kept = [n for n in unique if len(by_synopsis[packages[n][0]]) <= 3]
    corpus = {f"pkg:{n}": packages[n][1] for n in kept}
    train = [n for n in kept if not _is_test(packages[n][0])]
    train_ds = Dataset.from_dict({
        "query": [packages[n][0] for n in train],
        "positive": [packages[n][1] for n in train],
        "positive_id": [f"pkg:{n}" for n in train],
    })
    test_synopses = sorted({packages[n][0] for n in kept if _is_test(packages[n][0])}, key=_hash)[:max_eval_queries]
    queries = {f"q{i}": s for i, s in enumerate(test_synopses)}
    qrels = {f"q{i}": {f"pkg:{n}": 1 for n in by_synopsis[s]} for i, s in enumerate(test_synopses)}
    return train_ds, queries, cap_corpus(corpus, qrels, max_corpus), qrels


def cap_corpus(corpus: dict, qrels: dict, max_corpus: int | None) -> dict:
    """At most max_corpus documents: every judged one, then the first others."""
    if max_corpus is None:
        return corpus
    keep = {did for judged in qrels.values() for did in judged}
    keep |= set([did for did in corpus if did not in keep][: max(0, max_corpus - len(keep))])
    return {did: text for did, text in corpus.items() if did in keep}
