"""The commands around training: mine hard negatives, index a corpus, search it, score a run.

    contaccum-mine     --model M --train_file pairs.jsonl [--corpus_file corpus.jsonl] --output mined.jsonl
    contaccum-index    --model M --corpus_file corpus.jsonl --output index/
    contaccum-search   --model M --index index/ --queries_file queries.jsonl --output run.trec [--k 100]
    contaccum-evaluate --run run.trec --qrels_file qrels.tsv [--k 1,10,100]

File formats as contaccum-train's (its --help): pairs .jsonl/.json/.parquet/.csv/.tsv; queries and corpus BEIR
.jsonl or id<TAB>text .tsv, or --beir_folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); qrels BEIR or TREC.
Exit status: 0 done, 1 failed, 2 bad arguments. docs/mining-and-search.md.
"""
from __future__ import annotations

import argparse
import json
import sys


def _parser(prog: str, model: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        parser.add_argument("--model", required=True, help="a saved BiEncoder or sentence-transformers folder (or an "
                                                           "encoder checkpoint)")
        parser.add_argument("--batch_size", type=int, default=64)
    return parser


def _corpus_and_queries(args):
    from ..data.files import read_beir_folder, read_corpus, read_queries

    if getattr(args, "beir_folder", None):
        return read_beir_folder(args.beir_folder, args.split)
    corpus = read_corpus(args.corpus_file) if getattr(args, "corpus_file", None) else None
    queries = read_queries(args.queries_file) if getattr(args, "queries_file", None) else None
    return corpus, queries, None


def _write(dataset, path: str) -> None:
    suffix = path.rsplit(".", 1)[-1].lower()
    if suffix == "jsonl":
        dataset.to_json(path, lines=True, force_ascii=False)
    elif suffix == "json":
        dataset.to_json(path, lines=False, force_ascii=False)
    elif suffix == "parquet":
        dataset.to_parquet(path)
    elif suffix in ("csv", "tsv"):
        dataset.to_csv(path, sep="\t" if suffix == "tsv" else ",", index=False)
    else:
        raise ValueError(f"{path}: write .jsonl, .json, .parquet, .csv or .tsv")


def mine(argv=None) -> int:
    from ..data.files import load_training_file
    from ..retrieval.mining import mine_hard_negatives

    parser = _parser("contaccum-mine")
    parser.add_argument("--train_file", required=True, help="(query, positive[, positive_id]) pairs")
    parser.add_argument("--corpus_file", default=None, help="passages to mine from (default: the positives)")
    parser.add_argument("--beir_folder", default=None, help="a BEIR folder whose corpus.jsonl to mine from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", required=True, help="the mined pairs: .jsonl, .json, .parquet, .csv or .tsv")
    parser.add_argument("--num_negatives", type=int, default=3)
    parser.add_argument("--range_min", type=int, default=0, help="skip the top ranks (likely unlabelled positives)")
    parser.add_argument("--range_max", type=int, default=None, help="consider ranks up to this")
    parser.add_argument("--max_score", type=float, default=None, help="never a negative above this score")
    parser.add_argument("--min_score", type=float, default=None)
    parser.add_argument("--absolute_margin", type=float, default=None,
                        help="a negative scores at least this much below the positive")
    parser.add_argument("--relative_margin", type=float, default=None,
                        help="a negative scores at least this share of the positive's score below it (NV-Retriever: "
                             "0.05)")
    parser.add_argument("--sampling_strategy", choices=("top", "random"), default="top")
    parser.add_argument("--cross_encoder", default=None, help="a sentence-transformers CrossEncoder to re-score with")
    parser.add_argument("--output_format", choices=("n-tuple", "triplet"), default="n-tuple")
    parser.add_argument("--corpus_chunk_size", type=int, default=100_000)
    parser.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus, _, _ = _corpus_and_queries(args)
    cross_encoder = None
    if args.cross_encoder:
        from sentence_transformers import CrossEncoder

        cross_encoder = CrossEncoder(args.cross_encoder)
    mined = mine_hard_negatives(
        load_training_file(args.train_file), args.model, corpus, num_negatives=args.num_negatives,
        range_min=args.range_min, range_max=args.range_max, max_score=args.max_score, min_score=args.min_score,
        absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
        sampling_strategy=args.sampling_strategy, cross_encoder=cross_encoder, output_format=args.output_format,
        batch_size=args.batch_size, corpus_chunk_size=args.corpus_chunk_size, index=args.index, seed=args.seed)
    _write(mined, args.output)
    print(f"{len(mined)} rows with hard negatives written to {args.output}")
    return 0


def index(argv=None) -> int:
    from ..retrieval.encoders import as_encoder
    from ..retrieval.index import CorpusIndex

    parser = _parser("contaccum-index")
    parser.add_argument("--corpus_file", default=None)
    parser.add_argument("--beir_folder", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", required=True, help="the index folder")
    parser.add_argument("--chunk_size", type=int, default=100_000, help="passages per shard")
    parser.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat")
    args = parser.parse_args(argv)
    corpus, _, _ = _corpus_and_queries(args)
    if corpus is None:
        parser.error("give --corpus_file or --beir_folder")
    built = CorpusIndex.build(as_encoder(args.model, args.batch_size, True), corpus, args.output, args.chunk_size,
                              args.index)
    print(f"{len(built.ids)} passages in {built.shards} shard(s) indexed in {args.output}")
    return 0


def search(argv=None) -> int:
    from ..retrieval.encoders import as_encoder
    from ..retrieval.index import CorpusIndex
    from ..retrieval.runs import write_trec_run

    parser = _parser("contaccum-search")
    parser.add_argument("--index", required=True, help="a folder made by contaccum-index")
    parser.add_argument("--queries_file", default=None)
    parser.add_argument("--beir_folder", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--output", required=True, help="the TREC run file")
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args(argv)
    _, queries, _ = _corpus_and_queries(args)
    if queries is None:
        parser.error("give --queries_file or --beir_folder")
    run = CorpusIndex.load(args.index).search(as_encoder(args.model, args.batch_size, True), queries, args.k)
    write_trec_run(run, args.output)
    print(f"{len(run)} queries searched; run written to {args.output}")
    return 0


def evaluate(argv=None) -> int:
    from ..data.files import read_beir_folder, read_qrels
    from ..retrieval.runs import evaluate_run, read_trec_run

    parser = _parser("contaccum-evaluate", model=False)
    parser.add_argument("--run", required=True, help="a TREC run file")
    parser.add_argument("--qrels_file", default=None)
    parser.add_argument("--beir_folder", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", default="1,10,100", help="comma-separated cut-offs")
    parser.add_argument("--output", default=None, help="also write the metrics as JSON here")
    args = parser.parse_args(argv)
    qrels = read_beir_folder(args.beir_folder, args.split)[2] if args.beir_folder else \
        read_qrels(args.qrels_file) if args.qrels_file else parser.error("give --qrels_file or --beir_folder")
    metrics = evaluate_run(read_trec_run(args.run), qrels, [int(k) for k in args.k.split(",")])
    from .train import print_metrics

    print_metrics(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=1)
    return 0


def _entry(command):
    def run():
        sys.exit(command())
    return run


mine_command, index_command, search_command, evaluate_command = map(_entry, (mine, index, search, evaluate))

if __name__ == "__main__":  # python -m hf_contaccum.cli.tools mine ...
    sys.exit({"mine": mine, "index": index, "search": search, "evaluate": evaluate}[sys.argv[1]](sys.argv[2:]))
