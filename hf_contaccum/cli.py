"""contaccum-train: train a dense retriever with ContAccum on the hub's MS MARCO or your own files.

    contaccum-train --output_dir out --train_file train.jsonl --memory_bank_size 128
        --per_device_train_batch_size 8 --gradient_accumulation_steps 16
        --eval_queries_file queries.jsonl --eval_corpus_file corpus.jsonl --eval_qrels_file qrels.tsv
    accelerate launch -m hf_contaccum.cli ...        (several GPUs or processes)

File formats
    training data (--train_file; else --dataset_name from the hub): .jsonl/.json, .parquet, .csv or .tsv
              with columns query|anchor|question, positive|pos|passage|document, optional hard
              negatives negative, negative_1, ... (or a list column negatives) and ids positive_id, ...
    queries   .jsonl: {"_id": "q1", "text": "..."} per line      .tsv: q1<TAB>text
    corpus    .jsonl: {"_id": "d1", "title": "...", "text": "..."} .tsv: d1<TAB>text[<TAB>title]
    qrels     BEIR: query-id<TAB>corpus-id<TAB>score (a header line is recognised and skipped)
              TREC: qid 0 docid relevance (4 columns; tabs or spaces)

The data is checked before training (row, column and fix in every error); the model,
its model card (README.md) and the final metrics (eval_results.json) go to --output_dir.
Every option of ContAccumTrainingArguments (and so of transformers.TrainingArguments)
is accepted; they follow.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
from datasets import load_dataset
from transformers import HfArgumentParser

from .eval_files import read_corpus, read_qrels, read_queries
from .evaluation import RetrievalEvaluator
from .model import BiEncoder
from .trainer import ContAccumTrainer
from .training_args import ContAccumTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="bert-base-uncased", metadata={
        "help": "Encoder checkpoint (hub id or local folder) that both towers start from."})
    shared_encoder: bool = field(default=False, metadata={
        "help": "One tower for queries and passages (default: two towers, as DPR and the paper)."})
    pooling: str = field(default="cls", metadata={
        "help": "Pooling: 'cls' (DPR, the paper), 'mean', or 'last' (the last token: decoder LLM embedders)."})
    normalize: bool = field(default=False, metadata={"help": "L2-normalise the vectors."})
    query_prompt: str | None = field(default=None, metadata={
        "help": "Text put before every query, in training, evaluation and the saved model (e.g. 'query: ')."})
    passage_prompt: str | None = field(default=None, metadata={"help": "Text put before every passage."})
    append_eos: bool = field(default=False, metadata={
        "help": "End every text with the tokenizer's EOS token (decoders with --pooling last)."})
    lora_r: int = field(default=0, metadata={"help": "Train LoRA adapters of this rank instead of every weight (0: off)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "Comma-separated module names that get adapters (e.g. query,value or q_proj,v_proj), or all-linear."})


def peft_config(model_args: ModelArguments):
    if not model_args.lora_r:
        return None
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      target_modules=targets if targets == "all-linear" else targets.split(","))


@dataclass
class DataArguments:
    dataset_name: str = field(default="sentence-transformers/msmarco-bm25", metadata={
        "help": "Hub dataset of (query, positive, negative) triples, used when --train_file is not given."})
    dataset_config: str | None = field(default="triplet", metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={
        "help": "Local training data (.jsonl/.json, .parquet, .csv or .tsv) with query/positive[/negative...] columns."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    eval_queries_file: str | None = field(default=None, metadata={
        "help": "Evaluation queries: BEIR queries.jsonl or id<TAB>text (formats at the top of --help)."})
    eval_corpus_file: str | None = field(default=None, metadata={
        "help": "Evaluation corpus: BEIR corpus.jsonl or id<TAB>text[<TAB>title]."})
    eval_qrels_file: str | None = field(default=None, metadata={
        "help": "Relevance judgments: BEIR qrels tsv (query-id corpus-id score, header optional) or TREC qrels."})
    eval_k: str = field(default="1,10,20,100", metadata={"help": "Comma-separated cut-offs k of the metrics."})
    max_memory_gb: float | None = field(default=None, metadata={
        "help": "Cap CUDA memory to this many GB per process (torch.cuda.set_per_process_memory_fraction), to "
                "reproduce a small card such as the paper's 11 GB on a larger one."})


def load_train(data: DataArguments):
    if data.train_file:
        suffix = data.train_file.rsplit(".", 1)[-1].lower()
        kind = {"parquet": "parquet", "csv": "csv", "tsv": "csv"}.get(suffix, "json")
        options = {"delimiter": "\t"} if suffix == "tsv" else {}
        ds = load_dataset(kind, data_files=data.train_file, split="train", **options)
    else:
        ds = load_dataset(data.dataset_name, data.dataset_config, split="train")
    if data.max_train_samples is not None:
        ds = ds.select(range(min(data.max_train_samples, len(ds))))
    return ds


def load_evaluator(data: DataArguments, args: ContAccumTrainingArguments):
    files = [data.eval_queries_file, data.eval_corpus_file, data.eval_qrels_file]
    if not any(files):
        return None
    if not all(files):
        raise ValueError("evaluation needs all three of --eval_queries_file, --eval_corpus_file, --eval_qrels_file")
    k_values = tuple(int(k) for k in data.eval_k.split(","))
    return RetrievalEvaluator(read_queries(data.eval_queries_file), read_corpus(data.eval_corpus_file),
                              read_qrels(data.eval_qrels_file), k_values=k_values,
                              query_max_length=args.query_max_length, passage_max_length=args.passage_max_length,
                              show_progress=not args.disable_tqdm)


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, ContAccumTrainingArguments), prog="contaccum-train",
                              usage="contaccum-train [--option value ...]   (every option is listed after the formats)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    prompts = {side: text for side, text in (("query", model_args.query_prompt), ("passage", model_args.passage_prompt))
               if text}
    model = BiEncoder.from_encoder(model_args.model_name_or_path, shared=model_args.shared_encoder,
                                   pooling=model_args.pooling, normalize=model_args.normalize, prompts=prompts,
                                   peft_config=peft_config(model_args), append_eos=model_args.append_eos)
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
    dataset = data.train_file and os.path.basename(data.train_file) or data.dataset_name
    if args.push_to_hub:
        trainer.push_to_hub(dataset=dataset)  # writes the model card, then uploads
    else:
        trainer.create_model_card(dataset=dataset)
    return metrics


if __name__ == "__main__":
    main()
