"""Model card, push_to_hub with a mocked HfApi (no network), and the three loading routes."""
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers.models import tiny_model
from helpers.trainers import trainer_args
from huggingface_hub import HfApi

from hf_contaccum import BiEncoder, ContAccumTrainer


class _RepoUrl(str):
    repo_id = "someone/tiny-contaccum"


@pytest.fixture
def mocked_hub(tmp_path):
    uploads = []

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, **kwargs):
        files = sorted(os.path.relpath(os.path.join(root, f), folder_path)
                       for root, _, names in os.walk(folder_path) for f in names)
        ignore = kwargs.get("ignore_patterns") or []
        files = [f for f in files if not any(
            __import__("fnmatch").fnmatch(f, pattern) or __import__("fnmatch").fnmatch(f.split(os.sep)[0], pattern)
            for pattern in ignore)]
        readme = os.path.join(folder_path, "README.md")
        uploads.append({"repo_id": repo_id, "path_in_repo": path_in_repo, "files": files,
                        "readme": Path(readme).read_text() if os.path.exists(readme) else None})

        class Done:
            def done(self):
                return True

            is_done = done

        return Done()

    with mock.patch.object(HfApi, "create_repo", return_value=_RepoUrl("https://hub/someone/tiny-contaccum")) as cr, \
            mock.patch.object(HfApi, "upload_folder", upload_folder):
        yield cr, uploads


def test_push_to_hub_at_end_with_model_card(tmp_path, tokenizer, toy_dataset, mocked_hub):
    create_repo, uploads = mocked_hub
    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=2, push_to_hub=True,
                        hub_model_id="someone/tiny-contaccum", hub_strategy="end")
    model = tiny_model()
    model.tokenizer = tokenizer
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(16), processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub(finetuned_from="tiny-bert", dataset="toy-pairs")
    assert create_repo.call_count == 1
    final = uploads[-1]
    assert final["repo_id"] == "someone/tiny-contaccum"
    assert {"README.md", "config.json", "model.safetensors", "modules.json"} <= set(final["files"])
    assert os.path.join("query_encoder", "model.safetensors") in final["files"]
    assert not any("contaccum_bank" in f for f in final["files"])  # the bank never lands in the model repo
    card = final["readme"]
    for expected in ("library_name: hf_contaccum", "base_model: tiny-bert", "- toy-pairs", "## ContAccum training",
                     "| N_local (per-device micro-batch) | 4 |", "| K (accumulation steps) | 2 |",
                     "| N_total (pairs per optimizer step) | 8 |",
                     "| memory_bank_size (query bank / passage bank) | 8 / 8 |", "GradNormRatio (gradient norm", "BiEncoder.from_pretrained(\"someone/tiny-contaccum\")",
                     "@inproceedings{kim2024contaccum", "@inproceedings{gao2021gradcache", "- transformers:"):
        assert expected in card, expected
    # a shared tower has no tower ratio: the card shows the measured GradNormRatio and never says it was not
    assert "not measured" not in card


def test_card_metrics_in_cut_off_order(tmp_path, tokenizer, toy_dataset):
    from hf_contaccum.model.card import build_model_card

    trainer = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, max_steps=1),
                               train_dataset=toy_dataset(8), processing_class=tokenizer)
    trainer.train()
    trainer.state.log_history.append({"eval_ndcg@100": 0.4, "eval_ndcg@1": 0.1, "eval_ndcg@20": 0.3,
                                      "eval_ndcg@10": 0.2, "step": 1})
    card = build_model_card(trainer)
    rows = [line for line in card.splitlines() if line.startswith("| ndcg@")]
    assert rows == ["| ndcg@1 | 0.1000 |", "| ndcg@10 | 0.2000 |", "| ndcg@20 | 0.3000 |", "| ndcg@100 | 0.4000 |"]


def test_hub_strategy_checkpoint_pushes_bank_only_in_last_checkpoint(tmp_path, tokenizer, toy_dataset, mocked_hub):
    _, uploads = mocked_hub
    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=2, push_to_hub=True, save_strategy="steps",
                        save_steps=1, hub_model_id="someone/tiny-contaccum", hub_strategy="checkpoint")
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(16), processing_class=tokenizer)
    trainer.train()
    roots = [u for u in uploads if u["path_in_repo"] in (None, "", ".")]
    checkpoints = [u for u in uploads if u["path_in_repo"] == "last-checkpoint"]
    assert roots and checkpoints
    assert all(not any("contaccum_bank" in f for f in u["files"]) for u in roots)
    assert any("contaccum_bank_rank0.pt" in u["files"] for u in checkpoints)


@pytest.mark.parametrize("shared", [True, False])
def test_saved_model_loads_three_ways_with_identical_embeddings(tmp_path, tokenizer, shared):
    from transformers import AutoModel

    model = tiny_model(shared=shared, normalize=True)
    model.tokenizer = tokenizer
    model.eval()
    path = tmp_path / "saved"
    model.save_pretrained(path)
    texts = ["apple banana cherry", "delta echo"]
    q, p = model.encode_queries(texts), model.encode_passages(texts)

    reloaded = BiEncoder.from_pretrained(path)  # route 1
    assert torch.allclose(reloaded.encode_queries(texts), q, atol=1e-6)
    assert torch.allclose(reloaded.encode_passages(texts), p, atol=1e-6)

    for tower, expected in [("query_encoder", q)] + ([] if shared else [("passage_encoder", p)]):  # route 2
        encoder = AutoModel.from_pretrained(path, subfolder=tower).eval()
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        assert torch.allclose(emb, expected, atol=1e-6), tower

    if shared:  # route 3
        st = pytest.importorskip("sentence_transformers")
        emb = st.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
        assert torch.allclose(emb.cpu(), p, atol=1e-5)


def test_loading_without_a_saved_tokenizer_gives_none_and_a_broken_one_fails(tmp_path, tokenizer):
    tiny_model().save_pretrained(tmp_path / "bare")  # a model saved without its tokenizer
    assert BiEncoder.from_pretrained(tmp_path / "bare").tokenizer is None
    model = tiny_model()
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path / "full")
    assert BiEncoder.from_pretrained(tmp_path / "full").tokenizer(["apple"])["input_ids"] == tokenizer(["apple"])["input_ids"]
    (tmp_path / "full" / "tokenizer.json").write_text("{not json")  # broken, not missing: say so
    with pytest.raises(Exception):  # noqa: B017 (transformers' own error, which differs by version)
        BiEncoder.from_pretrained(tmp_path / "full")


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("normalize", [False, True])
def test_saved_model_scores_with_its_training_similarity(tmp_path, tokenizer, toy_dataset, similarity, normalize):
    """The similarity is part of the saved model: BiEncoder and SentenceTransformer give the same scores."""
    st = pytest.importorskip("sentence_transformers")
    model = tiny_model(normalize=normalize)
    model.tokenizer = tokenizer
    args = trainer_args(tmp_path, similarity=similarity, temperature=0.05 if similarity == "cos" else 1.0,
                        max_steps=1)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(8), processing_class=tokenizer)
    trainer.train()
    path = tmp_path / "saved"
    trainer.save_model(str(path))
    trainer.create_model_card()
    assert f"model.similarity(q, p)  # {'cosine similarity' if similarity == 'cos' else 'dot product'}" in (
        tmp_path / "out" / "README.md").read_text()
    queries, passages = ["apple banana", "kilo lima mike"], ["banana cherry", "lima", "apple pie and more"]
    reloaded = BiEncoder.from_pretrained(path)
    ours = reloaded.similarity(reloaded.encode_queries(queries), reloaded.encode_passages(passages))
    sentence_model = st.SentenceTransformer(str(path), device="cpu")
    theirs = sentence_model.similarity(sentence_model.encode(queries, convert_to_tensor=True),
                                       sentence_model.encode(passages, convert_to_tensor=True))
    assert torch.allclose(ours, theirs.cpu(), atol=1e-5)
    assert sentence_model.similarity_fn_name == {"cos": "cosine", "dot": "dot"}[similarity]
    if similarity == "cos" and not normalize:  # the case that used to be scored with the dot product
        raw = reloaded.encode_queries(queries) @ reloaded.encode_passages(passages).T
        assert not torch.allclose(raw, ours, atol=1e-3)


def test_towers_are_saved_from_the_gathered_state_dict(tmp_path, tokenizer):
    """Under FSDP the Trainer passes the gathered full state dict: the tower folders must hold it too."""
    from transformers import AutoModel

    model = tiny_model(shared=False)
    model.tokenizer = tokenizer
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "saved", state_dict=state)
    for tower in ("query_encoder", "passage_encoder"):
        saved = AutoModel.from_pretrained(tmp_path / "saved", subfolder=tower).state_dict()
        live = getattr(model, tower).state_dict()
        name = "embeddings.word_embeddings.weight"
        assert torch.equal(saved[name], live[name] + 1.0), tower
    assert model.get_input_embeddings() is model.query_encoder.get_input_embeddings()


def test_every_trainable_parameter_gets_a_gradient(tmp_path, tokenizer, toy_dataset):
    """No trainable parameter that the forward never uses (FSDP/DeepSpeed resume needs its optimizer state)."""
    for shared, pooling, loaded in [(True, "mean", False), (False, "cls", False), (True, "mean", True)]:
        model = tiny_model(shared=shared, pooling=pooling)
        if loaded:  # from_pretrained rebuilds the parameters: the pooler must be frozen again
            model.save_pretrained(tmp_path / "saved")
            model = BiEncoder.from_pretrained(tmp_path / "saved")
        args = trainer_args(tmp_path, max_steps=1, gradient_accumulation_steps=1, learning_rate=0.0)
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(8), processing_class=tokenizer)
        batch = trainer._prepare_inputs(trainer.data_collator(list(toy_dataset(4))))
        trainer.compute_loss(model, batch).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing and any("pooler" in n for n, p in model.named_parameters() if not p.requires_grad)


def test_models_without_adapters_do_not_need_peft(monkeypatch, tmp_path):
    """peft is optional: the quick start's install has none."""
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # any `import peft` now fails
    model = tiny_model()
    model.save_pretrained(tmp_path / "saved")
    assert BiEncoder.from_pretrained(tmp_path / "saved").config.peft_config is None


def test_a_sentence_transformers_folder_brings_its_own_settings(tmp_path, tokenizer):
    """BiEncoder.from_pretrained and the CLI read a sentence-transformers folder's pooling, normalisation, similarity
    and length (from_pretrained on such a folder used to fail: AutoConfig found no model_type); flags given win."""
    from helpers.st import save_encoder
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import (
        Normalize,
        Pooling,
        Transformer,
    )

    from hf_contaccum.cli.train import ModelArguments, build_model
    from hf_contaccum.integrations.training_args import ContAccumTrainingArguments

    folder = tmp_path / "st"
    st = SentenceTransformer(modules=[Transformer(save_encoder(tmp_path), max_seq_length=48),
                                      Pooling(16, pooling_mode="cls"), Normalize()], device="cpu")
    st.save(str(folder))
    model = BiEncoder.from_pretrained(str(folder))
    assert (model.config.pooling, model.config.normalize, model.config.similarity) == ("cls", True, "cos")
    assert model.config.shared and model.config.passage_max_length == 48
    texts = ["kilo lima mike", "oscar"]
    assert torch.allclose(model.encode_passages(texts), torch.tensor(st.encode(texts)), atol=1e-5)
    args = ContAccumTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    built = build_model(ModelArguments(model_name_or_path=str(folder)), args, given=set())
    assert built.config.shared and built.config.pooling == "cls" and args.similarity == "cos"
    assert args.temperature_value == 0.05 and args.passage_max_length == 48
    explicit = ContAccumTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    built = build_model(ModelArguments(model_name_or_path=str(folder), pooling="mean", shared_encoder=False),
                        explicit, given={"pooling", "shared_encoder"})
    assert built.config.pooling == "mean" and not built.config.shared


def test_a_saved_model_encodes_at_the_lengths_it_trained_at(tmp_path, tokenizer, toy_dataset):
    model = tiny_model()
    model.tokenizer = tokenizer
    args = trainer_args(tmp_path, max_steps=1, query_max_length=8, passage_max_length=12)
    ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(8), processing_class=tokenizer).train()
    model.save_pretrained(tmp_path / "saved")
    reloaded = BiEncoder.from_pretrained(tmp_path / "saved")
    assert (reloaded.config.query_max_length, reloaded.config.passage_max_length) == (8, 12)
    long = ["a much longer passage text than twelve characters"]
    assert torch.allclose(reloaded.encode_passages(long), model.cpu().encode_passages(long), atol=1e-6)
    assert torch.allclose(reloaded.encode_passages(long), reloaded.encode_passages(long, max_length=12), atol=1e-6)
    assert not torch.allclose(reloaded.encode_passages(long), reloaded.encode_passages(long, max_length=40), atol=1e-4)
    st_config = json.loads((tmp_path / "saved" / "query_encoder" / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == 12
