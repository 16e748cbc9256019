"""LoRA/PEFT towers, decoder (LLM) embedders with last-token pooling, query and passage prompts."""
import copy
import json

import pytest
import torch
from helpers.data import toy_rows
from helpers.models import (
    make_decoder_tokenizer,
    make_tokenizer,
    saved_base_model,
    tiny_bert_config,
    tiny_decoder_config,
)
from helpers.references import chunked_reference_grads
from helpers.trainers import on_device, trainer_args

from hf_contaccum import BiEncoder, ContAccumTrainer, ContrastiveCollator

peft = pytest.importorskip("peft")
LORA = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
        "mistral": ["q_proj", "v_proj"]}
QUERIES = ["ab cd", "efg", "a much longer query text here"]
PASSAGES = ["abc def ghi", "jk", "lmn op qr st"]


def lora(family, dropout=0.0):
    # init_lora_weights=False: B is random too, so the adapters change the embeddings from the first step
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=LORA[family], lora_dropout=dropout,
                           init_lora_weights=False)


def base_folder(tmp_path, family):
    if family == "bert":
        return saved_base_model(tmp_path / "base", tiny_bert_config(), make_tokenizer(tmp_path))
    return saved_base_model(tmp_path / "base", tiny_decoder_config(family), make_decoder_tokenizer())


def decoder(tmp_path, family="llama", **kwargs):
    return BiEncoder.from_encoder(base_folder(tmp_path, family), pooling="last", append_eos=True, **kwargs)


def _train(model, out, data, **overrides):
    args = trainer_args(out, **{"memory_bank_size": 8, "max_steps": 3, **overrides})
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=data, processing_class=model.tokenizer)
    trainer.train()
    return trainer


# -- prompts -----------------------------------------------------------------------------
def test_prompts_are_put_before_texts_in_training_on_both_collator_paths(tmp_path):
    from datasets import Dataset

    tokenizer = make_tokenizer(tmp_path)
    rows = toy_rows(4, num_negatives=1)
    collator = ContrastiveCollator(tokenizer, 32, 32, prompts={"query": "q: ", "passage": "p: "})
    batch = collator(rows)
    expected = tokenizer(["q: " + r["query"] for r in rows], padding=True, return_tensors="pt")["input_ids"]
    assert torch.equal(batch["query_input_ids"], expected)
    passages = ["p: " + r["positive"] for r in rows] + ["p: " + r["negative"] for r in rows]
    assert torch.equal(batch["passage_input_ids"], tokenizer(passages, padding=True, return_tensors="pt")["input_ids"])
    once = Dataset.from_list(rows).map(collator.encode_rows, batched=True, remove_columns=list(rows[0]))
    padded = collator(list(once))
    assert all(torch.equal(padded[k], batch[k]) for k in batch)


def test_prompts_are_saved_and_used_by_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    model = BiEncoder.from_encoder(base_folder(tmp_path, "bert"), prompts={"query": "q: ", "passage": "p: "})
    model.save_pretrained(tmp_path / "saved")
    st = SentenceTransformer(str(tmp_path / "saved"))
    ours_q, ours_p = model.encode_queries(QUERIES), model.encode_passages(PASSAGES)
    assert not torch.allclose(ours_q, BiEncoder.from_encoder(base_folder(tmp_path, "bert")).encode_queries(QUERIES))
    assert torch.allclose(torch.tensor(st.encode(QUERIES, prompt_name="query")), ours_q, atol=1e-5)
    assert torch.allclose(torch.tensor(st.encode_query(QUERIES)), ours_q, atol=1e-5)
    assert torch.allclose(torch.tensor(st.encode_document(PASSAGES)), ours_p, atol=1e-5)
    reloaded = BiEncoder.from_pretrained(tmp_path / "saved")
    assert reloaded.config.prompts == {"query": "q: ", "passage": "p: "}
    assert torch.allclose(reloaded.encode_queries(QUERIES), ours_q, atol=1e-6)


def test_prompts_reach_the_model_card(tmp_path):
    model = BiEncoder.from_encoder(base_folder(tmp_path, "bert"), prompts={"query": "q: "})
    trainer = _train(model, tmp_path, _dataset(8), max_steps=1)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| query prompt | `'q: '` |" in card and 'prompt_name="query"' in card


def test_bad_prompts_are_refused():
    with pytest.raises(ValueError, match="prompts maps 'query' and/or 'passage'"):
        BiEncoder.from_encoder_config(tiny_bert_config(), prompts={"document": "d: "})


# -- decoders ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decoder_last_token_pooling_ignores_the_padding_side(tmp_path, family):
    model = decoder(tmp_path, family)
    ids = model.tokenizer(QUERIES)["input_ids"]
    assert all(row[-1] == model.tokenizer.eos_token_id for row in ids)  # EOS appended by the saved tokenizer
    model.tokenizer.padding_side = "right"
    right = model.encode_queries(QUERIES)
    model.tokenizer.padding_side = "left"
    left = model.encode_queries(QUERIES)
    # rotary positions are relative, so only a wrong pooled position could tell the two apart
    assert torch.allclose(left, right, atol=1e-5)
    alone = torch.cat([model.encode_queries([q]) for q in QUERIES])  # no padding at all
    assert torch.allclose(alone, right, atol=1e-5)


def test_append_eos_survives_truncation_saving_and_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    model = decoder(tmp_path)
    long = model.tokenizer(["abcdefghij" * 5], truncation=True, max_length=8)["input_ids"][0]
    assert len(long) == 8 and long[-1] == model.tokenizer.eos_token_id and long[0] == model.tokenizer.bos_token_id
    model.save_pretrained(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved")("ab")["input_ids"][-1] == model.tokenizer.eos_token_id
    st = SentenceTransformer(str(tmp_path / "saved"))
    modules = json.loads((tmp_path / "saved" / "1_Pooling" / "config.json").read_text())
    assert modules["pooling_mode_lasttoken"] and not modules["pooling_mode_mean_tokens"]
    assert torch.allclose(torch.tensor(st.encode(QUERIES)), model.encode_queries(QUERIES, max_length=64), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_trains_with_bank_and_resumes_exactly(tmp_path, family):
    data = _dataset(40, negatives=1)
    common = {"bank_hard_negatives": True, "max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    full = _train(decoder(tmp_path / "a", family), tmp_path / "a", data, **common)
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    resumed_model = decoder(tmp_path / "b", family)
    args = trainer_args(tmp_path / "b", memory_bank_size=8, **common)
    resumed = ContAccumTrainer(model=resumed_model, args=args, train_dataset=data,
                               processing_class=resumed_model.tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(full.memory_bank.queries, resumed.memory_bank.queries)


def test_gradient_checkpointing_with_gradcache_and_bank_equals_without(tmp_path):
    data = _dataset(24, negatives=1)
    results = []
    for checkpointing in (False, True):
        model = decoder(tmp_path / str(checkpointing), peft_config=lora("llama"))
        trainer = _train(model, tmp_path / str(checkpointing), data, gradcache_chunk_size=2,
                         gradient_checkpointing=checkpointing, bank_hard_negatives=True)
        results.append(({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
                        [h["loss"] for h in trainer.state.log_history if "loss" in h]))
    (plain, plain_losses), (checkpointed, checkpointed_losses) = results
    assert checkpointed_losses == pytest.approx(plain_losses, rel=1e-5)
    assert len(plain) == 4 and all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


# -- LoRA / PEFT towers ----------------------------------------------------------------------
@pytest.mark.parametrize("shared", [True, False])
def test_only_adapters_train_and_every_loader_gives_the_same_embeddings(tmp_path, shared):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    base = base_folder(tmp_path, "bert")
    model = BiEncoder.from_encoder(base, shared=shared, peft_config=lora("bert"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 4 * (1 if shared else 2)  # A and B of query and value, per tower
    # lengths no text here reaches: every loader below then sees the same tokens (a saved model encodes at the
    # lengths it trained at; sentence-transformers has one max_seq_length for both sides)
    trainer = _train(model, tmp_path, _dataset(16), max_steps=2, learning_rate=1e-2, query_max_length=40,
                     passage_max_length=40)
    assert trainer.state.global_step == 2
    model.cpu()  # trained where the tests train (conftest.DEVICE); compared below with models loaded on the CPU
    q, p = model.encode_queries(QUERIES), model.encode_passages(PASSAGES)
    model.save_pretrained(tmp_path / "saved")
    # hf_contaccum: the BiEncoder checkpoint holds base weights and adapters
    reloaded = BiEncoder.from_pretrained(tmp_path / "saved")
    assert reloaded.config.peft_config["r"] == 2
    assert [n for n, p in reloaded.named_parameters() if p.requires_grad] == trainable  # loading kept base weights frozen
    assert torch.allclose(reloaded.encode_queries(QUERIES), q, atol=1e-6)
    assert torch.allclose(reloaded.encode_passages(PASSAGES), p, atol=1e-6)
    # transformers + peft: each tower folder is a PEFT adapter on the base model
    tower = PeftModel.from_pretrained(AutoModel.from_pretrained(base), tmp_path / "saved" / "query_encoder").eval()
    features = model.tokenizer(QUERIES, padding=True, return_tensors="pt")
    assert torch.allclose(model.pool(tower(**features).last_hidden_state, features["attention_mask"]), q, atol=1e-5)
    # merged: plain towers that load everywhere, sentence-transformers included
    model.merge_adapters()
    assert model.config.peft_config is None and not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.encode_queries(QUERIES), q, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    plain = AutoModel.from_pretrained(tmp_path / "merged" / "query_encoder").eval()
    assert torch.allclose(model.pool(plain(**features).last_hidden_state, features["attention_mask"]), q, atol=1e-5)
    if shared:
        st = SentenceTransformer(str(tmp_path / "merged"))
        assert torch.allclose(torch.tensor(st.encode(QUERIES)), q, atol=1e-5)


def test_adapter_resume_is_exact(tmp_path):
    data = _dataset(40, negatives=1)
    common = {"bank_hard_negatives": True, "max_steps": 4, "save_strategy": "steps", "save_steps": 2,
              "memory_bank_size": 8, "learning_rate": 1e-2}
    base = base_folder(tmp_path, "bert")

    def run(out, resume=None):
        model = BiEncoder.from_encoder(base, peft_config=lora("bert", dropout=0.1))
        trainer = ContAccumTrainer(model=model, args=trainer_args(out, **common), train_dataset=data,
                                   processing_class=model.tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", str(tmp_path / "a" / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(full.memory_bank.passages, resumed.memory_bank.passages)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradcache_with_lora_dropout_equals_the_full_batch(tmp_path, family):
    model = (BiEncoder.from_encoder(base_folder(tmp_path, family), peft_config=lora(family, dropout=0.3))
             if family == "bert" else decoder(tmp_path, peft_config=lora(family, dropout=0.3)))
    rows = toy_rows(6, num_negatives=2)
    batch = on_device(ContrastiveCollator(model.tokenizer, 16, 24)(rows))
    args = trainer_args(tmp_path, per_device_train_batch_size=6, memory_bank_size=0, mask_false_negatives=False,
                        gradcache_chunk_size=2)
    from datasets import Dataset

    trainer = ContAccumTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                               processing_class=model.tokenizer)
    trainer.current_gradient_accumulation_steps = 2
    reference = chunked_reference_grads(trainer, copy.deepcopy(model), batch, 2, seed=7, k=2)
    torch.manual_seed(7)
    trainer.training_step(model, batch)
    assert len(reference) == 4  # the adapters, nothing else
    for name, prm in model.named_parameters():
        if name in reference:
            assert torch.allclose(prm.grad, reference[name], atol=1e-6, rtol=1e-4), name
    # and the replay matters: other dropout masks give other gradients
    other = chunked_reference_grads(trainer, copy.deepcopy(model), batch, 2, seed=8, k=2)
    assert any(not torch.allclose(other[n], reference[n], atol=1e-6) for n in reference)


def _dataset(n, negatives=0):
    from datasets import Dataset

    return Dataset.from_list(toy_rows(n, num_negatives=negatives))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_one_tower_call_keeps_decoder_embeddings(tmp_path, padding_side):
    """Appended masked positions come after every real token: a causal decoder's texts keep their positions
    and last tokens, right or left padded."""
    model = decoder(tmp_path).eval()
    model.tokenizer.padding_side = padding_side
    batch = ContrastiveCollator(model.tokenizer, 16, 24)(toy_rows(4, num_negatives=1))
    features = {key: batch[key] for key in batch if key.endswith(("input_ids", "attention_mask"))}
    assert features["query_input_ids"].shape[1] < features["passage_input_ids"].shape[1]
    with torch.no_grad():
        two, one = model(**features), model(**features, one_tower_call=True)
    assert torch.allclose(one.query_embeddings, two.query_embeddings, atol=1e-5)
    assert torch.allclose(one.passage_embeddings, two.passage_embeddings, atol=1e-5)
