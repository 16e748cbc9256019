"""Train a dense retriever on MS MARCO (or your own files) with ContAccum.

    accelerate launch examples/run_msmarco.py --output_dir out --memory_bank_size 1024 \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 16 --max_memory_gb 11

By default the training triples (query, positive, mined hard negative) come from the hub
(--dataset_name/--dataset_config); --train_file reads local jsonl or parquet instead.
Evaluation uses BEIR-format files: queries.jsonl and corpus.jsonl ({"_id", "text"[, "title"]})
and a qrels tsv ("query-id corpus-id score", with a header line). Every option of
ContAccumTrainingArguments (and so of transformers.TrainingArguments) is accepted.
"""
from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import HfArgumentParser

from hf_contaccum import BiEncoder, ContAccumTrainer, ContAccumTrainingArguments
from hf_contaccum.evaluation import RetrievalEvaluator

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="bert-base-uncased", metadata={
        "help": "Encoder checkpoint (hub id or local folder) that both towers start from."})
    shared_encoder: bool = field(default=False, metadata={
        "help": "One tower for queries and passages (default: two towers, as DPR and the paper)."})
    pooling: str = field(default="cls", metadata={"help": "Pooling: 'cls' (DPR, the paper) or 'mean'."})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise the vectors."})


@dataclass
class DataArguments:
    dataset_name: str = field(default="sentence-transformers/msmarco-bm25", metadata={
        "help": "Hub dataset of (query, positive, negative) triples, used when --train_file is not given."})
    dataset_config: str | None = field(default="triplet", metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local training data (.jsonl/.json or .parquet) with query/positive[/negative...] columns."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    eval_queries_file: str | None = field(default=None, metadata={"help": "BEIR queries.jsonl for evaluation."})
    eval_corpus_file: str | None = field(default=None, metadata={"help": "BEIR corpus.jsonl for evaluation."})
    eval_qrels_file: str | None = field(default=None, metadata={"help": "BEIR qrels tsv for evaluation."})
    eval_k: str = field(default="1,10,20,100", metadata={"help": "Comma-separated cut-offs k of the metrics."})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "Cap CUDA memory to this many GB per process (torch.cuda.set_per_process_memory_fraction), to "
                "reproduce a small card such as the paper's 11 GB on a larger one."})


def load_train(data: DataArguments):
    if data.train_file:
        kind = "parquet" if data.train_file.endswith(".parquet") else "json"
        ds = load_dataset(kind, data_files=data.train_file, split="train")
    else:
        ds = load_dataset(data.dataset_name, data.dataset_config, split="train")
    if data.max_train_samples is not None:
        ds = ds.select(range(min(data.max_train_samples, len(ds))))
    return ds


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_evaluator(data: DataArguments, args: ContAccumTrainingArguments):
    files = [data.eval_queries_file, data.eval_corpus_file, data.eval_qrels_file]
    if not any(files):
        return None
    if not all(files):
        raise ValueError("evaluation needs all three of --eval_queries_file, --eval_corpus_file, --eval_qrels_file")
    queries = {str(r["_id"]): r["text"] for r in _read_jsonl(data.eval_queries_file)}
    corpus = {str(r["_id"]): (r.get("title", "") + " " + r["text"]).strip() for r in _read_jsonl(data.eval_corpus_file)}
    qrels: dict = {}
    with open(data.eval_qrels_file, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        next(reader)  # header
        for qid, did, score in reader:
            qrels.setdefault(qid, {})[did] = int(score)
    k_values = tuple(int(k) for k in data.eval_k.split(","))
    return RetrievalEvaluator(queries, corpus, qrels, k_values=k_values, query_max_length=args.query_max_length,
                              passage_max_length=args.passage_max_length, similarity=args.similarity,
                              show_progress=not args.disable_tqdm)


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, ContAccumTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml")):
        model_args, data, args = parser.parse_yaml_file(sys.argv[1]) if sys.argv[1].endswith(".yaml") \
            else parser.parse_json_file(sys.argv[1])
    else:
        model_args, data, args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING)
    if data.max_memory_gb is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(args.device).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, data.max_memory_gb / total), args.device)
        logger.info("CUDA memory capped at %.1f of %.1f GB", data.max_memory_gb, total)

    model = BiEncoder.from_encoder(model_args.model_name_or_path, shared=model_args.shared_encoder,
                                   pooling=model_args.pooling, normalize=model_args.normalize)
    train = load_train(data)
    evaluator = load_evaluator(data, args)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=train, evaluator=evaluator,
                               processing_class=model.tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    metrics = trainer.evaluate() if evaluator is not None else {}
    if metrics:
        trainer.save_metrics("eval", metrics)
        logger.info("final retrieval metrics: %s", json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
