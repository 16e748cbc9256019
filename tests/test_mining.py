"""Hard-negative mining, corpus indexes, search, TREC runs and MTEB, against references: a numpy brute force,
sentence-transformers' mine_hard_negatives, the in-memory evaluator and pytrec_eval."""
import json
import random
import string
import subprocess
import sys

import pytest
from helpers.launch import worker_env
from helpers.models import tiny_model
from helpers.references import naive_mining
from helpers.trainers import trainer_args

from hf_contaccum import ContAccumTrainer
from hf_contaccum.data.sample import load_wordnet_sample
from hf_contaccum.quickstart import default_encoder_path
from hf_contaccum.retrieval.encoders import as_encoder
from hf_contaccum.retrieval.mining import mine_hard_negatives

FILTERS = [  # the defaults in the fast tier, each filter in the full suite (each encodes the corpus again)
    pytest.param({}, id="defaults"),
    *(pytest.param(options, marks=pytest.mark.slow, id=",".join(options)) for options in (
        {"range_min": 2, "range_max": 12}, {"max_score": 0.6}, {"relative_margin": 0.05},
        {"absolute_margin": 0.1, "min_score": 0.1})),
]


@pytest.fixture(scope="module")
def wordnet():
    """Real pairs and passages: WordNet definitions and lemmas (a few rows share a definition: several positives)."""
    train, _, corpus, _ = load_wordnet_sample(max_train=120, max_corpus=400)
    rows = [{"query": r["query"], "positive": r["positive"]} for r in train]
    return rows, list(corpus.values())


@pytest.fixture(scope="module")
def minilm():
    from hf_contaccum import BiEncoder

    return BiEncoder.from_encoder(default_encoder_path())


def _negatives(dataset, count):
    return {row["query"]: [row[f"negative_{i}"] for i in range(1, count + 1)] for row in dataset}


def _assert_same(mined, reference, count):
    got = _negatives(mined, count)
    complete = {q: n for q, n in reference.items() if len(n) == count}  # rows with too few negatives are dropped
    assert got.keys() == complete.keys()
    assert all(got[q] == complete[q] for q in got), [q for q in got if got[q] != complete[q]][:3]


@pytest.mark.parametrize("options", FILTERS)
def test_mining_equals_a_brute_force_reference_on_wordnet(wordnet, minilm, options):
    rows, corpus = wordnet
    mined = mine_hard_negatives(rows, minilm, corpus, num_negatives=3, show_progress=False, **options)
    _assert_same(mined, naive_mining(rows, corpus, as_encoder(minilm), 3, **options), 3)


def test_mining_a_random_corpus_in_shards_equals_the_whole(tmp_path, tokenizer):
    """A random corpus, a tiny random encoder, the positives as the corpus: chunks of 7 passages (its index built
    and searched shard by shard, the top candidates merged) give exactly what one chunk gives, and the reference."""
    rng = random.Random(0)
    word = lambda: "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
    rows = [{"query": f"{word()} {word()}", "positive": f"{word()} {word()} {word()}"} for _ in range(40)]
    model = tiny_model()
    model.tokenizer = tokenizer
    whole = mine_hard_negatives(rows, model, num_negatives=4, show_progress=False)
    sharded = mine_hard_negatives(rows, model, num_negatives=4, corpus_chunk_size=7, show_progress=False)
    assert whole.to_list() == sharded.to_list() and len(whole) == 40
    _assert_same(whole, naive_mining(rows, [], as_encoder(model), 4), 4)


@pytest.mark.slow
def test_mining_finds_what_sentence_transformers_finds(wordnet):
    """Where the options mean the same: the offline MiniLM as a SentenceTransformer, top sampling, n-tuples. The
    differences, documented: our rows keep the input's order (theirs are grouped by query), and a corpus given as
    {id: text} adds negative_i_id columns."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as theirs

    rows, corpus = wordnet
    model = SentenceTransformer(default_encoder_path(), device="cpu")
    for options in ({"range_min": 1, "range_max": 20}, {"relative_margin": 0.05}, {"max_score": 0.7}):
        reference = theirs(Dataset.from_list(rows), model, corpus=corpus, num_negatives=3, output_format="n-tuple",
                           verbose=False, **options)
        ours = mine_hard_negatives(rows, model, corpus, num_negatives=3, show_progress=False, **options)
        expected = {(r["query"], r["positive"]): [r[f"negative_{i}"] for i in (1, 2, 3)] for r in reference}
        got = {(r["query"], r["positive"]): [r[f"negative_{i}"] for i in (1, 2, 3)] for r in ours}
        assert got == expected, options


@pytest.mark.slow
def test_a_cross_encoder_rescores_and_ids_follow_the_negatives(wordnet, minilm):
    """A cross-encoder's scores replace the model's for the filters (here a stand-in scoring by shared letters);
    with a corpus of ids, the positive is found by its id and negatives carry theirs; triplets, one per negative."""
    rows, corpus = wordnet

    class SharedLetters:
        def predict(self, pairs, batch_size=32):
            return [len(set(a) & set(b)) / 26 for a, b in pairs]

    scorer = SharedLetters()
    mined = mine_hard_negatives(rows, minilm, corpus, num_negatives=2, cross_encoder=scorer, max_score=0.5,
                                show_progress=False)
    _assert_same(mined, naive_mining(rows, corpus, as_encoder(minilm), 2, max_score=0.5,
                                     rescore=lambda q, texts: scorer.predict([(q, t) for t in texts])), 2)
    by_id = {f"d{i}": text for i, text in enumerate(dict.fromkeys(corpus + [r["positive"] for r in rows]))}
    ids = {text: i for i, text in by_id.items()}
    with_ids = [dict(r, positive_id=ids[r["positive"]]) for r in rows]
    triplets = mine_hard_negatives(with_ids, minilm, by_id, num_negatives=2, output_format="triplet",
                                   show_progress=False)
    assert set(triplets.column_names) == {"query", "positive", "positive_id", "negative", "negative_id"}
    assert all(by_id[r["negative_id"]] == r["negative"] and r["negative_id"] != r["positive_id"] for r in triplets)
    assert len(triplets) == 2 * len(rows)


def test_a_mined_dataset_trains_with_banked_hard_negatives(wordnet, tmp_path, tokenizer):
    rows, corpus = wordnet
    model = tiny_model()
    model.tokenizer = tokenizer
    model.config.query_max_length = model.config.passage_max_length = 32  # the tiny BERT has 64 positions
    mined = mine_hard_negatives(rows[:48], model, corpus[:100], num_negatives=2,
                                show_progress=False)
    args = trainer_args(tmp_path, memory_bank_size=16, bank_hard_negatives=True, max_steps=3)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=mined, processing_class=tokenizer)
    trainer.train()
    assert trainer.memory_bank.num_hard_negatives == 2 and trainer.memory_bank.fill == 16


def _beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q, docs in qrels.items() for d, r in docs.items()))


@pytest.mark.slow
def test_the_commands_index_search_and_evaluate_like_the_evaluator(tmp_path, minilm):
    """contaccum-index, -search and -evaluate on a BEIR folder: the run file is valid TREC (pytrec_eval reads it) and
    its metrics equal the in-memory RetrievalEvaluator's and pytrec_eval's; contaccum-mine writes a file the trainer
    reads."""
    import pytrec_eval

    from hf_contaccum import RetrievalEvaluator
    from hf_contaccum.retrieval.runs import read_trec_run

    train, queries, corpus, qrels = load_wordnet_sample(max_train=60, max_eval_queries=60, max_corpus=300)
    _beir(tmp_path / "beir", corpus, queries, qrels)
    minilm.save_pretrained(tmp_path / "model")
    run = lambda *args: subprocess.run([sys.executable, "-m", "hf_contaccum.cli.tools", *args], env=worker_env(),
                                       capture_output=True, text=True, timeout=600, check=False)
    common = ["--model", str(tmp_path / "model"), "--beir_folder", str(tmp_path / "beir")]
    done = run("index", *common, "--output", str(tmp_path / "index"), "--chunk_size", "128")
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("search", *common, "--index", str(tmp_path / "index"), "--output", str(tmp_path / "run.trec"))
    assert done.returncode == 0, done.stderr[-2000:]
    done = run("evaluate", "--run", str(tmp_path / "run.trec"), "--beir_folder", str(tmp_path / "beir"),
               "--output", str(tmp_path / "metrics.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    expected = RetrievalEvaluator(queries, corpus, qrels, k_values=(1, 10, 100), show_progress=False)(minilm)
    for key in ("ndcg@10", "recall@100", "mrr@10", "map@100"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-6), key
    with open(tmp_path / "run.trec") as f:
        trec = pytrec_eval.parse_run(f)
    official = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(trec)
    assert metrics["ndcg@10"] == pytest.approx(sum(v["ndcg_cut_10"] for v in official.values()) / len(official),
                                               abs=1e-6)
    assert read_trec_run(str(tmp_path / "run.trec")).keys() == trec.keys()
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": r["query"], "positive": r["positive"]}) + "\n"
                                                  for r in train))
    done = run("mine", "--model", str(tmp_path / "model"), "--train_file", str(tmp_path / "pairs.jsonl"),
               "--beir_folder", str(tmp_path / "beir"), "--output", str(tmp_path / "mined.jsonl"),
               "--num_negatives", "2", "--relative_margin", "0.05")
    assert done.returncode == 0, done.stderr[-2000:]
    from hf_contaccum.data.files import load_training_file
    from hf_contaccum.data.validation import check_dataset

    mined = load_training_file(str(tmp_path / "mined.jsonl"))
    assert check_dataset(mined).num_hard_negatives == 2 and "negative_2_id" in mined.column_names


def test_a_saved_model_runs_in_mteb_offline_as_the_evaluator_scores_it(tmp_path, minilm):
    """MTEB's own evaluation of a retrieval task built from the bundled data: queries through the query tower with
    the query prompt, documents through the passage tower; its nDCG@10 equals the RetrievalEvaluator's."""
    mteb = pytest.importorskip("mteb")
    from mteb.abstasks import AbsTaskRetrieval

    from hf_contaccum import RetrievalEvaluator
    from hf_contaccum.retrieval.mteb import MTEBModel

    _, queries, corpus, qrels = load_wordnet_sample(max_eval_queries=40, max_corpus=200)

    class WordNetReverseDictionary(AbsTaskRetrieval):
        metadata = mteb.TaskMetadata(
            name="WordNetReverseDictionary", description="WordNet definitions to lemmas (hf_contaccum's sample)",
            dataset={"path": "local/wordnet", "revision": "1"}, type="Retrieval", category="t2t",
            eval_splits=["test"], eval_langs=["eng-Latn"], main_score="ndcg_at_10", license="not specified",
            annotations_creators="derived", dialect=[], sample_creation="found", bibtex_citation="")

        def load_data(self, **kwargs):
            self.queries, self.relevant_docs = {"test": queries}, {"test": qrels}
            self.corpus = {"test": {d: {"title": "", "text": t} for d, t in corpus.items()}}
            self.data_loaded = True

    minilm.config.prompts = {"query": "query: ", "passage": "passage: "}  # the right tower gets the right prompt
    seen = []
    original = minilm.encode_queries
    minilm.encode_queries = lambda texts, *args, **kw: seen.append(len(texts)) or original(texts, *args, **kw)
    try:
        result = mteb.evaluate(MTEBModel(minilm), tasks=[WordNetReverseDictionary()], cache=None,
                               show_progress_bar=False)
        expected = RetrievalEvaluator(queries, corpus, qrels, k_values=(10,), show_progress=False)(minilm)
    finally:
        minilm.encode_queries, minilm.config.prompts = original, {}
    scores = result.task_results[0].scores["test"][0]
    assert sum(seen) >= len(queries)  # mteb's queries went through encode_queries
    assert scores["ndcg_at_10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
