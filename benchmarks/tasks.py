"""The benchmarks' retrieval tasks, one loader: load_task("wordnet" | "debian" | "code", ...).

Each returns (train Dataset[query, positive, positive_id], eval queries {qid: text}, corpus {did: text},
qrels {qid: {did: 1}}). Test queries never appear in training.

wordnet: the bundled WordNet extract (hf_contaccum.data.sample), a reverse dictionary.

debian: package search, built offline from Debian's package index. A query is a package's one-line
synopsis; its relevant passage is the first paragraph of the package's long description. Packages
whose first paragraph is not unique are dropped; a synopsis shared by up to three packages makes all
of them relevant, more generic ones are dropped. 10 % of the synopses (by a hash) are the test split.
The data is read from the apt lists of a Debian or Ubuntu machine after
`apt-get -o Acquire::Languages=en update` (the English descriptions).

code: code search, built offline from the Python standard library of the interpreter that runs it. A
query is the first sentence of a function's docstring; its relevant passage is that function's source
without the docstring (at most 40 lines). Functions whose code is not unique are dropped, and so are
sentences shared by more than three functions; 10 % of the sentences (by a hash) are the test split.
Tests, idlelib, tkinter and lib2to3 are skipped.

A task built on one machine travels to another (a GPU machine without apt lists) as one file:
save_task / load_task_file, found through $CONTACCUM_BENCH_TASKS.
"""
from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sysconfig

LISTS = "/var/lib/apt/lists"
SKIP = ("test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "ensurepip", "turtledemo")
MAX_LINES = 40


def load_task(task, eval_queries, corpus_size):
    """A task by name: carried from another machine when $CONTACCUM_BENCH_TASKS has it, else built here."""
    carried = os.path.join(os.environ.get("CONTACCUM_BENCH_TASKS", ""), f"{task}.json.gz")
    if os.environ.get("CONTACCUM_BENCH_TASKS") and os.path.exists(carried):
        return load_task_file(carried)
    if task == "code":
        return load_code_search(max_eval_queries=eval_queries, max_corpus=corpus_size)
    if task == "debian":
        return load_debian_packages(max_eval_queries=eval_queries, max_corpus=corpus_size)
    from hf_contaccum.data.sample import load_wordnet_sample

    return load_wordnet_sample(max_eval_queries=eval_queries, max_corpus=corpus_size)


# -- debian --------------------------------------------------------------------------------
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


def _is_test_synopsis(synopsis):  # split by synopsis, so that a query's relevant packages are all on one side
    return _hash(synopsis) % 10 == 0


def load_debian_packages(max_eval_queries=None, max_corpus=None, lists_dir=LISTS):
    """Returns (train Dataset[query, positive, positive_id], eval queries, corpus, qrels), like
    hf_contaccum.data.sample.load_wordnet_sample."""
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
    train = [n for n in kept if not _is_test_synopsis(packages[n][0])]
    train_ds = Dataset.from_dict({
        "query": [packages[n][0] for n in train],
        "positive": [packages[n][1] for n in train],
        "positive_id": [f"pkg:{n}" for n in train],
    })
    test_synopses = sorted({packages[n][0] for n in kept if _is_test_synopsis(packages[n][0])}, key=_hash)[:max_eval_queries]
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


# -- code ----------------------------------------------------------------------------------
def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _is_test_sentence(sentence: str) -> bool:
    return int(_sha1(sentence)[:8], 16) % 10 == 0


def _first_sentence(docstring: str) -> str | None:
    paragraph = docstring.strip().split("\n\n")[0]
    sentence = re.split(r"(?<=[.!?])\s", " ".join(paragraph.split()), maxsplit=1)[0]
    return sentence if 4 <= len(sentence.split()) <= 40 else None


def _functions(root: str):
    """(qualified name, first docstring sentence, code without the docstring) for every documented function."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP and not d.startswith(("_", ".")))
        for file in sorted(files):
            if not file.endswith(".py") or file.startswith("test"):
                continue
            path = os.path.join(directory, file)
            try:
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            lines = source.splitlines()
            for node in ast.walk(tree):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                docstring = ast.get_docstring(node)
                sentence = _first_sentence(docstring) if docstring else None
                if sentence is None or len(node.body) < 2:
                    continue
                doc_node = node.body[0]
                code = lines[node.lineno - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
                code = [line for line in code if line.strip()][:MAX_LINES]
                indent = min(len(line) - len(line.lstrip()) for line in code)
                yield f"{os.path.relpath(path, root)}:{node.name}:{node.lineno}", sentence, \
                    "\n".join(line[indent:] for line in code)


def load_code_search(max_eval_queries=None, max_corpus=None, root=None):
    """Returns (train Dataset[query, positive, positive_id], eval queries, corpus, qrels)."""
    from datasets import Dataset

    found = list(_functions(root or sysconfig.get_paths()["stdlib"]))
    by_code, by_sentence = {}, {}
    for name, sentence, code in found:
        by_code.setdefault(code, []).append((name, sentence))
    unique = sorted(((items[0][0], items[0][1], code) for code, items in by_code.items() if len(items) == 1),
                    key=lambda item: _sha1(item[0]))  # hash order: no bias by module
    for name, sentence, _ in unique:
        by_sentence.setdefault(sentence, []).append(name)
    kept = [(n, s, c) for n, s, c in unique if len(by_sentence[s]) <= 3]
    corpus = {f"fn:{n}": c for n, _, c in kept}
    train = [(n, s, c) for n, s, c in kept if not _is_test_sentence(s)]
    train_ds = Dataset.from_dict({"query": [s for _, s, _ in train], "positive": [c for _, _, c in train],
                                  "positive_id": [f"fn:{n}" for n, _, _ in train]})
    test_sentences = sorted({s for _, s, _ in kept if _is_test_sentence(s)}, key=_sha1)[:max_eval_queries]
    queries = {f"q{i}": s for i, s in enumerate(test_sentences)}
    qrels = {f"q{i}": {f"fn:{n}": 1 for n in by_sentence[s]} for i, s in enumerate(test_sentences)}
    return train_ds, queries, cap_corpus(corpus, qrels, max_corpus), qrels


if __name__ == "__main__":
    train, queries, corpus, qrels = load_code_search()
    print(f"{len(train)} training pairs, {len(queries)} test queries, {len(corpus)} functions")
    q = next(iter(queries))
    print("query:", queries[q])
    print("relevant:\n" + corpus[next(iter(qrels[q]))])


# -- carried tasks ------------------------------------------------------------------------
def save_task(path: str, task) -> None:
    train, queries, corpus, qrels = task
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"train": train.to_dict(), "queries": queries, "corpus": corpus, "qrels": qrels}, f)


def load_task_file(path: str):
    """(train Dataset, queries, corpus, qrels) as saved by save_task."""
    from datasets import Dataset

    with gzip.open(path, "rt", encoding="utf-8") as f:
        saved = json.load(f)
    return Dataset.from_dict(saved["train"]), saved["queries"], saved["corpus"], saved["qrels"]
