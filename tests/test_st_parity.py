"""sentence-transformers parity: every MNRL / CachedMNRL option, the wrappers (Matryoshka, AdaptiveLayer,
Matryoshka2d), several losses in one run, the lifecycle found without a callback, fit(). sentence-transformers'
own tests for these losses, adapted: our loss with a bank of 0 against theirs, with a bank against literal
references."""
import functools
import os

import pytest
import torch
from helpers.data import toy_rows
from helpers.references import naive_contaccum_loss
from helpers.st import assert_same_grads, features, grads_of, save_encoder, st_model

pytest.importorskip("sentence_transformers")
from sentence_transformers import (
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import (
    AdaptiveLayerLoss,
    CachedMultipleNegativesRankingLoss,
    Matryoshka2dLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim, manhattan_sim
from transformers import DefaultFlowCallback

from hf_contaccum import ContAccumCallback
from hf_contaccum.sentence_transformers import (
    CachedContAccumMultipleNegativesRankingLoss,
    ContAccumMultipleNegativesRankingLoss,
)

OPTIONS = [  # MNRL's options, each as its docs show them
    {},
    {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "partition_mode": "joint"},
    {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    {"hardness_mode": "in_batch_negatives", "hardness_strength": 9.0},
    {"hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    {"hardness_mode": "all_negatives", "hardness_strength": 3.0},
    {"similarity_fct": dot_score, "scale": 1.0},
    {"similarity_fct": euclidean_sim, "scale": 1.0},
    {"similarity_fct": manhattan_sim, "scale": 0.5},
    {"similarity_fct": functools.partial(cos_sim)},
]


def _name(options):
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in options.items()) or "defaults"


@pytest.fixture
def encoder(tmp_path):
    return lambda dropout=0.0: save_encoder(tmp_path, dropout)


@pytest.mark.parametrize("options", OPTIONS, ids=_name)
def test_every_mnrl_option_without_a_bank_equals_mnrl(encoder, options):
    model = st_model(encoder())
    feats = features(model, toy_rows(6, num_negatives=2), ["query", "positive", "negative", "negative_1"])
    ref_loss, ref = grads_of(model, MultipleNegativesRankingLoss(model, **options), feats)
    loss, got = grads_of(model, ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=0, **options), feats)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert_same_grads(got, ref)


@pytest.mark.parametrize("options", [OPTIONS[0], OPTIONS[1], OPTIONS[4], {"mini_batch_num_tokens": 40}],
                         ids=_name)
def test_cached_without_a_bank_equals_cached_mnrl_with_dropout(encoder, options):
    model = st_model(encoder(dropout=0.2))
    model.train()
    feats = features(model, toy_rows(7, num_negatives=1), ["query", "positive", "negative"])
    ref_loss, ref = grads_of(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **options), feats)
    ours = CachedContAccumMultipleNegativesRankingLoss(model, mini_batch_size=3, memory_bank_size=0, **options)
    loss, got = grads_of(model, ours, feats)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert_same_grads(got, ref)


def test_drop_in_defaults_and_config_keys(encoder):
    model = st_model(encoder())
    cached = CachedContAccumMultipleNegativesRankingLoss(model)
    assert cached.mini_batch_size == CachedMultipleNegativesRankingLoss(model).mini_batch_size == 32
    assert cached.uses_gradient_cache and callable(cached.calculate_loss)  # what MatryoshkaLoss wraps
    plain = ContAccumMultipleNegativesRankingLoss(model)
    assert plain.gather_across_devices is True and plain.get_config_dict()["memory_bank_size"] == "auto"
    theirs = set(MultipleNegativesRankingLoss(model).get_config_dict())
    assert theirs <= set(plain.get_config_dict())  # every MNRL key, same meaning
    cached_theirs = set(CachedMultipleNegativesRankingLoss(model).get_config_dict())
    assert cached_theirs <= set(cached.get_config_dict())


def test_scale_and_similarity_fct_stay_assignable_and_take_effect(encoder):
    model = st_model(encoder())
    feats = features(model, toy_rows(5), ["query", "positive"])
    loss = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=0)
    loss.scale, loss.similarity_fct = 5.0, dot_score
    assert loss.get_config_dict()["scale"] == 5.0 and loss.get_config_dict()["similarity_fct"] == "dot_score"
    assert loss.temperature == 0.2
    got = grads_of(model, loss, feats)
    ref = grads_of(model, MultipleNegativesRankingLoss(model, scale=5.0, similarity_fct=dot_score), feats)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert_same_grads(got[1], ref[1])
    banked = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=8)
    model.train()
    banked(features(model, toy_rows(4), ["query", "positive"]), None).backward()
    banked.scale = 10.0  # the banked vectors stay; the cached scores are rebuilt at the new scale
    assert banked.memory_bank.fill == 4 and banked.bank_for(16).temperature == 0.1
    with pytest.raises(ValueError, match="call loss.reset_bank"):
        banked.similarity_fct = dot_score


def _literal_matryoshka(model, batches, dims, bank_size, scale):
    """MatryoshkaLoss over ContAccum, written out: per dimension, the truncated unit vectors and a bank of them as
    python lists, the paper's loss at each, summed; one bank per dimension."""
    from sentence_transformers.sentence_transformer.losses.matryoshka import shrink

    banks = {dim: ([], []) for dim in dims}
    losses, grads = [], []
    for feats in batches:
        model.zero_grad()
        q, p = (model(dict(f))["sentence_embedding"] for f in feats)
        total = 0
        for dim in dims:
            qd, pd = shrink(q, dim), shrink(p, dim)
            bq, bp = banks[dim]
            empty = qd.new_zeros(0, dim)
            total = total + naive_contaccum_loss(qd, pd, None, torch.stack(bq) if bq else empty,
                                                 torch.stack(bp) if bp else empty, None, 1 / scale, cos=True)
            bq += list(torch.nn.functional.normalize(qd.detach(), dim=-1))
            bp += list(torch.nn.functional.normalize(pd.detach(), dim=-1))
            del bq[:-bank_size], bp[:-bank_size]
        total.backward()
        losses.append(total.detach())
        grads.append({n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None})
    return losses, grads


@pytest.mark.parametrize("cached", [False, True])
def test_matryoshka_keeps_one_bank_per_dimension_equal_to_the_literal_loss(encoder, cached):
    """MatryoshkaLoss wraps the loss with a bank (and with GradCache): one bank of each dimension's own vectors,
    against the literal per-dimension loss; no dimension's vectors land in another's bank."""
    path, dims = encoder(), [16, 8, 4]
    rows = toy_rows(4 * 4)
    batches = [features(st_model(path), rows[i:i + 4], ["query", "positive"]) for i in range(0, 16, 4)]
    model = st_model(path)
    ref_losses, ref_grads = _literal_matryoshka(st_model(path), batches, dims, 8, 20.0)
    inner = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=8, mini_batch_size=3 if cached else None)
    loss_fn = MatryoshkaLoss(model, inner, dims)
    model.train()
    for step, feats in enumerate(batches):
        loss, grads = grads_of(model, loss_fn, feats)
        assert torch.allclose(loss, ref_losses[step], atol=1e-5), (step, loss, ref_losses[step])
        assert_same_grads(grads, ref_grads[step], atol=5e-5)
    assert sorted((int(w) for w in inner.banks), reverse=True) == dims
    assert all(inner.banks[str(dim)].bank.fill == 8 and inner.banks[str(dim)].bank.dim == dim for dim in dims)


def test_matryoshka_with_a_bank_of_0_equals_matryoshka_over_mnrl(encoder):
    model = st_model(encoder())
    feats = features(model, toy_rows(6, num_negatives=1), ["query", "positive", "negative"])
    ref = grads_of(model, MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [16, 8]), feats)
    got = grads_of(model, MatryoshkaLoss(model, ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=0),
                                         [16, 8]), feats)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert_same_grads(got[1], ref[1])


def test_adaptive_layer_banks_the_models_own_embeddings_only(encoder):
    """AdaptiveLayerLoss calls the loss once for the whole model and again for earlier layers: every call reads the
    bank, only the first adds to it (the model's own final-layer vectors). With a bank of 0: AdaptiveLayerLoss over
    MNRL exactly (same layer sampling)."""
    path = encoder()
    model = st_model(path)
    feats = features(model, toy_rows(6), ["query", "positive"])
    torch.manual_seed(3)
    ref = grads_of(model, AdaptiveLayerLoss(model, MultipleNegativesRankingLoss(model)), feats, seed=3)
    got = grads_of(model, AdaptiveLayerLoss(model, ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=0)),
                   feats, seed=3)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    assert_same_grads(got[1], ref[1])
    inner = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=12)
    wrapped = AdaptiveLayerLoss(model, inner)
    model.train()
    for i in range(2):
        batch = features(model, toy_rows(8)[4 * i:4 * i + 4], ["query", "positive"])
        grads_of(model, wrapped, batch)
    bank = inner.memory_bank
    assert bank.fill == 8 and bank.num_enqueued == 8  # 2 micro-batches of 4 pairs: no intermediate-layer rows
    model.eval()
    with torch.no_grad():
        final = torch.nn.functional.normalize(model(dict(batch[0]))["sentence_embedding"], dim=-1)
    assert torch.allclose(bank.queries[4:8], final, atol=1e-5)  # the last micro-batch's final-layer queries


def test_matryoshka_2d_trains_with_a_bank(tmp_path, encoder):
    from datasets import Dataset

    model = st_model(encoder())
    inner = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=16)
    loss = Matryoshka2dLoss(model, inner, [16, 8])
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path, max_steps=3), loss=loss,
                                         train_dataset=Dataset.from_list(toy_rows(24)).rename_column("query", "anchor"))
    trainer.train()
    total = sum(bank.bank.num_enqueued for bank in inner.banks.values())
    assert total == 3 * 2 * 4  # one dimension per micro-batch (n_dims_per_step=1), final layer only


def test_static_embedding_with_mini_batches_is_refused(encoder):
    from helpers.models import make_tokenizer
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    static = SentenceTransformer(modules=[StaticEmbedding(make_tokenizer(None), embedding_dim=8)])
    with pytest.raises(ValueError, match="StaticEmbedding"):
        CachedContAccumMultipleNegativesRankingLoss(static)
    ContAccumMultipleNegativesRankingLoss(static)  # without mini-batches it is fine


def _args(out, **overrides):
    values = {"output_dir": str(out), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 4, "learning_rate": 1e-3, "report_to": "none", "save_strategy": "no", "logging_steps": 1,
              "use_cpu": True, "seed": 0, "disable_tqdm": True}
    values.update(overrides)
    return SentenceTransformerTrainingArguments(**values)


def test_the_loss_finds_its_trainer_and_the_logs_show_the_bank(tmp_path, encoder):
    """No callback argument: building SentenceTransformerTrainer with the loss adds the lifecycle right after
    DefaultFlowCallback (st_attach.py: the trainer is found on the stack; this fails if sentence-transformers
    stops moving the loss to the device while the trainer is built)."""
    from datasets import Dataset

    model = st_model(encoder())
    loss = ContAccumMultipleNegativesRankingLoss(model)  # memory_bank_size "auto": 4 x 2 = 8
    trainer = SentenceTransformerTrainer(model=model, args=_args(tmp_path), loss=loss,
                                         train_dataset=Dataset.from_list(toy_rows(32)).rename_column("query", "anchor"))
    callbacks = trainer.callback_handler.callbacks
    flow = next(i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback))
    assert isinstance(callbacks[flow + 1], ContAccumCallback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4 and all(h["bank_fill"] == 8 and h["negatives_per_query"] > 3 for h in logs)
    assert loss.memory_bank.size == 8 and loss.get_config_dict()["memory_bank_size"] == 8


def test_a_loss_per_dataset_each_resumes_its_own_bank(tmp_path, encoder):
    from datasets import Dataset, DatasetDict

    path = encoder()
    data = DatasetDict({name: Dataset.from_list(toy_rows(40, seed=i)).rename_column("query", "anchor")
                        for i, name in enumerate(("first", "second"))})

    def run(out, resume=None):
        model = st_model(path)
        losses = {name: ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=8) for name in data}
        trainer = SentenceTransformerTrainer(model=model, args=_args(out, save_strategy="steps", save_steps=2),
                                             train_dataset=data, loss=losses)
        trainer.train(resume_from_checkpoint=resume)
        return model, losses

    full_model, full = run(tmp_path / "a")
    files = sorted(f for f in os.listdir(tmp_path / "a" / "checkpoint-2") if f.startswith("contaccum_bank"))
    assert files == ["contaccum_bank_first_rank0.pt", "contaccum_bank_second_rank0.pt"]
    resumed_model, resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert not torch.equal(full["first"].memory_bank.queries, full["second"].memory_bank.queries)
    for name in data:
        assert torch.equal(full[name].memory_bank.queries, resumed[name].memory_bank.queries), name
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name


def test_fit_trains_and_checkpoints_the_bank(tmp_path, encoder):
    """The old model.fit API builds a SentenceTransformerTrainer inside: the loss finds it there too."""
    from sentence_transformers import InputExample
    from torch.utils.data import DataLoader

    model = st_model(encoder())
    examples = [InputExample(texts=[r["query"], r["positive"]]) for r in toy_rows(32)]
    loss = ContAccumMultipleNegativesRankingLoss(model, memory_bank_size=16)
    model.fit(train_objectives=[(DataLoader(examples, batch_size=8, shuffle=False), loss)], epochs=1,
              checkpoint_path=str(tmp_path / "checkpoints"), checkpoint_save_steps=2, show_progress_bar=False)
    assert loss.memory_bank.fill == 16
    saved = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("checkpoint-")]
    banks = [[f for f in os.listdir(tmp_path / "checkpoints" / d) if f.startswith("contaccum_bank")] for d in saved]
    assert saved and all(len(files) == 1 for files in banks), banks  # fit names its loss "_dataset_0"
