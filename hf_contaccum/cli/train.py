"""contaccum-train: train a dense retriever with ContAccum on your own files or the hub's MS MARCO.

    contaccum-train --output_dir out --train_file train.jsonl --memory_bank_size 128
        --per_device_train_batch_size 8 --gradient_accumulation_steps 16
        --eval_queries_file queries.jsonl --eval_corpus_file corpus.jsonl --eval_qrels_file qrels.tsv
    accelerate launch -m hf_contaccum.cli ...        (several GPUs or processes)

File formats
    training data (--train_file; else --dataset_name from the hub): .jsonl/.json, .parquet, .csv or .tsv
              with columns query|anchor|question, positive|pos|passage|document, optional hard
              negatives negative, negative_1, ... (or a list column negatives) and ids positive_id, ...;
              a .tsv/.csv without a header is read by position: query, positive, negative_1, ...
    queries   .jsonl: {"_id": "q1", "text": "..."} per line      .tsv: q1<TAB>text
    corpus    .jsonl: {"_id": "d1", "title": "...", "text": "..."} .tsv: d1<TAB>text[<TAB>title]
    qrels     BEIR: query-id<TAB>corpus-id<TAB>score (a header line is recognised and skipped)
              TREC: qid 0 docid relevance (4 columns; tabs or spaces)

The model folder decides the towers, pooling, normalisation and similarity when it is a
sentence-transformers model (or a saved BiEncoder); flags given win. The data is checked before
training (row, column and fix in every error); the model, its model card (README.md) and the final
metrics (eval_results.json, and a table on stdout) go to --output_dir. --resume_from_checkpoint latest
resumes from the newest complete checkpoint there. Exit status: 0 done, 1 failed, 2 bad arguments.
Every option of ContAccumTrainingArguments (and so of transformers.TrainingArguments) is accepted.
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

from ..data.files import load_training_file, read_corpus, read_qrels, read_queries
from ..evaluation.evaluator import RetrievalEvaluator
from ..integrations.trainer import ContAccumTrainer
from ..integrations.training_args import ContAccumTrainingArguments
from ..model.biencoder import BiEncoder
from ..model.hub import read_sentence_transformers_folder

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="bert-base-uncased", metadata={
        "help": "Encoder checkpoint (hub id or local folder) that both towers start from; a sentence-transformers "
                "folder brings its pooling, normalisation and similarity."})
    shared_encoder: bool | None = field(default=None, metadata={"nargs": "?", "const": True,
        "help": "One tower for queries and passages. Default: shared for a sentence-transformers folder, else "
                "two towers (DPR and the paper)."})
    pooling: str | None = field(default=None, metadata={
        "help": "'cls', 'mean', or 'last' (the last token: decoder embedders). Default: the folder's, else 'cls'."})
    normalize: bool | None = field(default=None, metadata={"nargs": "?", "const": True,
        "help": "L2-normalise the vectors. Default: the folder's, else no."})
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
        ds = load_training_file(data.train_file)
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
                              read_qrels(data.eval_qrels_file), k_values=k_values, show_progress=not args.disable_tqdm)


def build_model(model_args: ModelArguments, args: ContAccumTrainingArguments, given: set) -> BiEncoder:
    """The BiEncoder to train: a saved BiEncoder as it is, a sentence-transformers folder with its own pooling,
    normalisation and similarity, any other encoder with the paper's DPR setup (two towers, CLS, dot); flags given
    (`given`: the options on the command line) win."""
    path = model_args.model_name_or_path
    folder = read_sentence_transformers_folder(path) if os.path.isdir(path) else None
    saved = False
    if os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as handle:
            saved = json.load(handle).get("model_type") == "contaccum_biencoder"
    if saved:
        model = BiEncoder.from_pretrained(path)
    else:
        prompts = {side: text for side, text in (("query", model_args.query_prompt),
                                                 ("passage", model_args.passage_prompt)) if text}
        found = folder is not None
        model = BiEncoder.from_encoder(
            path, shared=model_args.shared_encoder if model_args.shared_encoder is not None else found,
            pooling=model_args.pooling or (None if found else "cls"),
            normalize=model_args.normalize if model_args.normalize is not None else (None if found else False),
            prompts=prompts or None, peft_config=peft_config(model_args), append_eos=model_args.append_eos)
    if "similarity" not in given and (saved or folder is not None):
        args.similarity = model.config.similarity  # the model's own; the temperature follows unless given
        if "temperature" not in given:
            args.temperature = None
        ContAccumTrainingArguments.check(args)
    for side in ("query", "passage"):  # the lengths a saved model trained at, unless given
        trained = getattr(model.config, f"{side}_max_length", None)
        if trained and f"{side}_max_length" not in given:
            setattr(args, f"{side}_max_length", trained)
    return model


def print_metrics(metrics: dict) -> None:
    """The final metrics as a table on stdout, cut-offs in numeric order."""
    def order(key):
        name, _, cutoff = key.partition("@")
        return name, int(cutoff) if cutoff.isdigit() else -1

    keys = sorted((k for k, v in metrics.items() if isinstance(v, (int, float))), key=order)
    width = max((len(k) for k in keys), default=6)
    print(f"{'metric':<{width}}  value")
    for key in keys:
        print(f"{key:<{width}}  {metrics[key]:.4f}")


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, ContAccumTrainingArguments), prog="contaccum-train",
                              usage="contaccum-train [--option value ...]   (every option is listed after the formats)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml")):
        model_args, data, args = parser.parse_yaml_file(sys.argv[1]) if sys.argv[1].endswith(".yaml") \
            else parser.parse_json_file(sys.argv[1])
    else:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # exit status 2, as argparse's own
        model_args, data, args = parsed
    argv_given = sys.argv[1:] if argv is None else argv
    given = {a[2:].split("=", 1)[0] for a in argv_given if a.startswith("--")}
    if isinstance(args.resume_from_checkpoint, str) and args.resume_from_checkpoint.lower() in ("true", "latest"):
        args.resume_from_checkpoint = True
    logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING)
    if data.max_memory_gb is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(args.device).total_memory / 1e9
        torch.cuda.set_per_process_memory_fraction(min(1.0, data.max_memory_gb / total), args.device)
        logger.info("CUDA memory capped at %.1f of %.1f GB", data.max_memory_gb, total)

    model = build_model(model_args, args, given)
    train = load_train(data)
    evaluator = load_evaluator(data, args)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=train, evaluator=evaluator,
                               processing_class=model.tokenizer)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    metrics = trainer.evaluate() if evaluator is not None else {}
    if metrics:
        trainer.save_metrics("eval", metrics)
    dataset = data.train_file and os.path.basename(data.train_file) or data.dataset_name
    if args.push_to_hub:
        trainer.push_to_hub(dataset=dataset)  # writes the model card, then uploads
    else:
        trainer.create_model_card(dataset=dataset)
    if metrics and args.process_index == 0:
        print_metrics(metrics)
    return metrics


def run(argv=None) -> int:
    """The console script: 0 when training finished (an error raises: exit status 1; bad arguments: 2)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run())
