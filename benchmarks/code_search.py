"""A third real retrieval task, different in kind from WordNet and Debian: code search.

Built offline from the Python standard library of the interpreter that runs it (real code,
present on every machine with Python). A query is the first sentence of a function's or
method's docstring ("Return the canonical path of the specified filename."); its relevant
passage is that function's source without the docstring (signature and body, at most 40
lines). Functions whose code is not unique are dropped, and so are docstring sentences
shared by more than three functions (a few generic ones such as "Return a copy." would
make a query ambiguous); a sentence shared by up to three functions makes all of them
relevant. 10 % of the sentences (by a hash) are the test split; training never sees them.
Tests, idlelib, tkinter and lib2to3 are skipped (generated or test code).
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig

SKIP = ("test", "tests", "idlelib", "tkinter", "lib2to3", "site-packages", "ensurepip", "turtledemo")
MAX_LINES = 40


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def _is_test(sentence: str) -> bool:
    return int(_hash(sentence)[:8], 16) % 10 == 0


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
    from debian_packages import cap_corpus

    found = list(_functions(root or sysconfig.get_paths()["stdlib"]))
    by_code, by_sentence = {}, {}
    for name, sentence, code in found:
        by_code.setdefault(code, []).append((name, sentence))
    unique = sorted(((items[0][0], items[0][1], code) for code, items in by_code.items() if len(items) == 1),
                    key=lambda item: _hash(item[0]))  # hash order: no bias by module
    for name, sentence, _ in unique:
        by_sentence.setdefault(sentence, []).append(name)
    kept = [(n, s, c) for n, s, c in unique if len(by_sentence[s]) <= 3]
    corpus = {f"fn:{n}": c for n, _, c in kept}
    train = [(n, s, c) for n, s, c in kept if not _is_test(s)]
    train_ds = Dataset.from_dict({"query": [s for _, s, _ in train], "positive": [c for _, _, c in train],
                                  "positive_id": [f"fn:{n}" for n, _, _ in train]})
    test_sentences = sorted({s for _, s, _ in kept if _is_test(s)}, key=_hash)[:max_eval_queries]
    queries = {f"q{i}": s for i, s in enumerate(test_sentences)}
    qrels = {f"q{i}": {f"fn:{n}": 1 for n in by_sentence[s]} for i, s in enumerate(test_sentences)}
    return train_ds, queries, cap_corpus(corpus, qrels, max_corpus), qrels


if __name__ == "__main__":
    train, queries, corpus, qrels = load_code_search()
    print(f"{len(train)} training pairs, {len(queries)} test queries, {len(corpus)} functions")
    q = next(iter(queries))
    print("query:", queries[q])
    print("relevant:\n" + corpus[next(iter(qrels[q]))])
