"""examples/: run_msmarco.py end to end on local files, its --help, and the subclassing example."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.data import toy_rows
from helpers.models import make_tokenizer, tiny_model
from helpers.trainers import trainer_args

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny BERT with its tokenizer saved as an ordinary encoder checkpoint."""
    from helpers.models import tiny_bert_config
    from transformers import BertModel

    path = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(path)
    make_tokenizer(tmp_path).save_pretrained(path)
    return path


def _write_beir(tmp_path, rows):
    with open(tmp_path / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": r["query"]}) + "\n" for i, r in enumerate(rows))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": r["positive"]}) + "\n" for i, r in enumerate(rows))
    with open(tmp_path / "qrels.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["query-id", "corpus-id", "score"])
        for i in range(len(rows)):
            w.writerow([f"q{i}", f"d{i}", 1])


def test_run_msmarco_trains_end_to_end_on_local_files(tmp_path, tiny_checkpoint):
    rows = toy_rows(32, num_negatives=1)
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_beir(tmp_path, rows[:12])
    out = tmp_path / "out"
    metrics = _load("run_msmarco").main([
        "--model_name_or_path", str(tiny_checkpoint), "--train_file", str(train_file), "--output_dir", str(out),
        "--eval_queries_file", str(tmp_path / "queries.jsonl"), "--eval_corpus_file", str(tmp_path / "corpus.jsonl"),
        "--eval_qrels_file", str(tmp_path / "qrels.tsv"), "--eval_k", "1,5", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--memory_bank_size", "8",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"])
    assert 0 <= metrics["eval_ndcg@5"] <= 1 and "eval_accuracy@1" in metrics
    card = (out / "README.md").read_text()  # the model card, written at the end
    assert "base_model: tiny-bert" in card and str(tmp_path) not in card
    assert "| negatives per query" in card and "n/a" not in card
    assert (out / "eval_results.json").exists()
    from hf_contaccum import BiEncoder

    reloaded = BiEncoder.from_pretrained(out)
    assert reloaded.encode_queries(["apple banana"]).shape == (1, 16)


def test_cli_trains_a_lora_decoder_with_prompts(tmp_path):
    from helpers.models import (
        make_decoder_tokenizer,
        saved_base_model,
        tiny_decoder_config,
    )

    from hf_contaccum import BiEncoder

    base = saved_base_model(tmp_path / "qwen", tiny_decoder_config("qwen2"), make_decoder_tokenizer())
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(16)))
    out = tmp_path / "out"
    _load("run_msmarco").main([
        "--model_name_or_path", base, "--train_file", str(train_file), "--output_dir", str(out), "--shared_encoder",
        "--pooling", "last", "--append_eos", "--query_prompt", "Instruct: find the passage\nQuery: ",
        "--lora_r", "2", "--lora_target_modules", "q_proj,v_proj", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--memory_bank_size", "8",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"])
    model = BiEncoder.from_pretrained(out)
    assert model.config.pooling == "last" and model.config.peft_config["r"] == 2
    assert model.config.prompts == {"query": "Instruct: find the passage\nQuery: "}
    assert model.tokenizer("ab")["input_ids"][-1] == model.tokenizer.eos_token_id
    assert (out / "query_encoder" / "adapter_config.json").exists()
    assert "| adapters | LORA r 2" in (out / "README.md").read_text()


@pytest.mark.slow
def test_run_msmarco_help_documents_every_option():
    script = os.path.join(EXAMPLES, "run_msmarco.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    module = _load("run_msmarco")
    import dataclasses

    for cls in (module.ModelArguments, module.DataArguments):
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out and f.metadata.get("help"), f.name
    for option in ("--memory_bank_size", "--gradcache_chunk_size", "--gather_across_devices", "--temperature",
                   "--max_memory_gb", "--train_file"):
        assert option in out
    head = "\n".join(out.splitlines()[:40])  # the file formats come first, before the 700 lines of options
    assert "File formats" in head and "TREC: qid 0 docid relevance" in head
    installed = subprocess.run([sys.executable, "-m", "hf_contaccum.cli", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert installed.startswith("usage: contaccum-train")


def test_subclassing_example_trains_with_a_narrower_bank(tmp_path, tokenizer, toy_dataset):
    module = _load("subclass_truncated_embeddings")
    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=2)
    trainer = module.TruncatedEmbeddingTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(16),
                                               processing_class=tokenizer, dim=6)
    trainer.train()
    assert trainer.memory_bank.queries.shape == (8, 6)


def test_sentence_transformers_example_trains_checkpoints_and_resumes(tmp_path, tiny_checkpoint):
    pytest.importorskip("sentence_transformers")
    module = _load("sentence_transformers_contaccum")
    common = ["--model", str(tiny_checkpoint), "--output_dir", str(tmp_path / "out"), "--batch_size", "4",
              "--gradient_accumulation_steps", "2", "--memory_bank_size", "8", "--max_train", "64",
              "--eval_queries", "20", "--corpus_size", "100", "--mini_batch_size", "3"]
    _, after = module.main(common + ["--max_steps", "2"])
    assert "wordnet_cosine_ndcg@10" in after and 0 <= after["wordnet_cosine_ndcg@10"] <= 1
    assert (tmp_path / "out" / "checkpoint-2" / "contaccum_bank_rank0.pt").exists()
    assert not any("contaccum_bank" in f for f in os.listdir(tmp_path / "out" / "final"))
    module.main(common + ["--max_steps", "4", "--resume"])  # continues from checkpoint-2, bank restored
    assert (tmp_path / "out" / "checkpoint-4" / "contaccum_bank_rank0.pt").exists()


@pytest.mark.slow
def test_quick_start_trains_and_prints_before_and_after(tmp_path, capsys):
    """The README's first quick-start command's program, on fewer steps and queries."""
    from hf_contaccum import quickstart

    before, after = quickstart.main(["--output_dir", str(tmp_path / "qs"), "--max_steps", "2", "--eval_queries", "20",
                                     "--corpus_size", "100", "--per_device_train_batch_size", "4",
                                     "--gradient_accumulation_steps", "2", "--memory_bank_size", "8"])
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and "before" in printed and "after" in printed
    assert 0 < before["eval_ndcg@10"] <= 1 and 0 < after["eval_ndcg@10"] <= 1
    assert (tmp_path / "qs" / "config.json").exists()
