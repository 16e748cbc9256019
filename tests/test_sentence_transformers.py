"""hf_contaccum's sentence-transformers loss against sentence-transformers' own losses, ContAccumTrainer, and
itself resumed; the bank in checkpoints, never in the model; the lifecycle without a callback."""
import copy
import os

import pytest
import torch
from helpers.data import toy_rows
from helpers.launch import launch
from helpers.st import (
    assert_same_grads,
    features,
    grads_of,
    save_encoder,
    st_model,
    tokenize,
)
from helpers.trainers import (
    accelerate_told_the_accumulation_steps,
    assert_trained_alike,
    trainer_args,
)

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformerTrainer
from sentence_transformers.util import cos_sim, dot_score

from hf_contaccum import BiEncoder, ContAccumTrainer
from hf_contaccum.data.keys import token_keys
from hf_contaccum.sentence_transformers import (
    ContAccumBankCallback,
    ContAccumMultipleNegativesRankingLoss,
)

ContAccumLoss = ContAccumMultipleNegativesRankingLoss

from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)


@pytest.fixture
def encoder_dir(tmp_path):
    return lambda dropout=0.0, seed=0: save_encoder(tmp_path, dropout, seed)


@pytest.mark.parametrize("similarity, scale", [(cos_sim, 20.0), (dot_score, 1.0)])
def test_without_bank_equals_multiple_negatives_ranking_loss(encoder_dir, similarity, scale):
    model = st_model(encoder_dir())
    rows = toy_rows(6, num_negatives=2)
    feats = features(model, rows, ["query", "positive", "negative", "negative_1"])
    ref_loss, ref = grads_of(model, MultipleNegativesRankingLoss(model, scale=scale, similarity_fct=similarity), feats)
    ours = ContAccumLoss(model, memory_bank_size=0, scale=scale, similarity_fct=similarity)
    loss, got = grads_of(model, ours, feats)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert_same_grads(got, ref)


def test_mini_batch_size_equals_cached_mnrl_with_dropout(encoder_dir):
    model = st_model(encoder_dir(dropout=0.2))
    model.train()
    rows = toy_rows(7, num_negatives=1)  # 7 rows in mini-batches of 3: a short last one
    feats = features(model, rows, ["query", "positive", "negative"])
    ref_loss, ref = grads_of(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=3), feats)
    ours = ContAccumLoss(model, memory_bank_size=0, mini_batch_size=3)
    loss, got = grads_of(model, ours, feats)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    assert_same_grads(got, ref)
    _, without_replay = grads_of(model, ContAccumLoss(model, memory_bank_size=0), feats)  # other dropout masks
    assert any(not torch.allclose(without_replay[n], ref[n], atol=1e-6) for n in ref)


def _sequential_batches(dataset, batch_size, drop_last, *args, **kwargs):
    from torch.utils.data import BatchSampler, SequentialSampler

    return BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last)


def _st_args(tmp_path, **overrides):
    from sentence_transformers import SentenceTransformerTrainingArguments

    values = {"output_dir": str(tmp_path), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
              "max_steps": 3, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "weight_decay": 0.0,
              "max_grad_norm": 0.0, "optim": "adamw_torch", "report_to": "none", "save_strategy": "no",
              "logging_steps": 1, "use_cpu": True, "seed": 0, "disable_tqdm": True,
              "batch_sampler": _sequential_batches}
    values.update(overrides)
    return SentenceTransformerTrainingArguments(**values)


def test_training_with_a_bank_equals_contaccum_trainer(tmp_path, encoder_dir, small_chunks):
    from datasets import Dataset

    path = encoder_dir()
    rows = toy_rows(4 * 2 * 3, num_negatives=1)
    data = Dataset.from_list(rows)
    model = st_model(path)
    small_chunks(3)
    loss = ContAccumLoss(model, memory_bank_size=10, scale=20.0, bank_hard_negatives=True)
    trainer = SentenceTransformerTrainer(model=model, args=_st_args(tmp_path / "st"), train_dataset=data, loss=loss)
    trainer.train()

    reference = BiEncoder.from_encoder(path, shared=True, pooling="mean")
    args = trainer_args(tmp_path / "ours", memory_bank_size=10, bank_hard_negatives=True,
                        use_cpu=True, similarity="cos", temperature=0.05, query_max_length=64, passage_max_length=64)
    ours = ContAccumTrainer(model=reference, args=args, train_dataset=data, processing_class=reference.tokenizer)
    ours.train()

    st_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert st_losses == pytest.approx([h["loss"] for h in ours.state.log_history if "loss" in h], rel=1e-5)
    # BERT's pooler is built by both loaders (randomly: it is not in the folder) and used by neither
    st_params = {n: p for n, p in model[0].auto_model.named_parameters() if not n.startswith("pooler.")}
    assert len(st_params) > 10
    for name, value in st_params.items():
        assert torch.allclose(value, dict(reference.query_encoder.named_parameters())[name], atol=1e-5), name
    assert torch.allclose(loss.memory_bank.queries, ours.memory_bank.queries, atol=1e-5)


@pytest.mark.parametrize("control", [{"bank_refresh_steps": 1}, {"bank_drift_probe": 3}])
def test_bank_refresh_and_drift_probe_equal_contaccum_trainer_and_need_a_step_boundary(tmp_path, encoder_dir, control,
                                                                                      small_chunks):
    """bank_refresh_steps and bank_drift_probe in sentence-transformers' loss: the same bank updates as
    ContAccumTrainer's (each tested against a literal loop), started by the lifecycle at each step."""
    from datasets import Dataset

    path = encoder_dir()
    data = Dataset.from_list(toy_rows(4 * 2 * 4))
    st_args = _st_args(tmp_path / "st", max_steps=4, learning_rate=1e-2)
    (name, value), = control.items()
    small_chunks(3)

    def st_run(settings):
        model = st_model(path)
        loss = ContAccumLoss(model, memory_bank_size=10, **settings)
        trainer = SentenceTransformerTrainer(model=model, args=st_args, train_dataset=data, loss=loss)
        trainer.train()
        return model, loss, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    model, loss, st_losses = st_run(control)
    assert loss.get_config_dict()[name] == value
    reference = BiEncoder.from_encoder(path, shared=True, pooling="mean")
    ours = ContAccumTrainer(model=reference, args=trainer_args(
        tmp_path / "ours", memory_bank_size=10, max_steps=4, learning_rate=1e-2, use_cpu=True,
        similarity="cos", temperature=0.05, query_max_length=64, passage_max_length=64, **control),
        train_dataset=data, processing_class=reference.tokenizer)
    ours.train()
    assert st_losses == pytest.approx([h["loss"] for h in ours.state.log_history if "loss" in h], rel=1e-5)
    for param, tensor in model[0].auto_model.named_parameters():
        if not param.startswith("pooler."):  # built by both loaders, used by neither
            assert torch.allclose(tensor, dict(reference.query_encoder.named_parameters())[param], atol=1e-5), param
    assert torch.allclose(loss.memory_bank.queries, ours.memory_bank.queries, atol=1e-5)
    assert st_run({})[2] != pytest.approx(st_losses, rel=1e-5)  # the update changes training: the test can tell

    unwatched = ContAccumLoss(st_model(path), memory_bank_size=8, **control)
    unwatched.model.train()
    with pytest.raises(ValueError, match="need to know when an optimizer step begins.*begin_step"):
        unwatched(features(unwatched.model, toy_rows(4), ["query", "positive"]))
    with pytest.raises(ValueError, match="not banked hard negatives"):
        ContAccumLoss(st_model(path), memory_bank_size=8, bank_refresh_steps=1, bank_hard_negatives=True)
    with pytest.raises(ValueError, match="set one of them to 0"):
        ContAccumLoss(st_model(path), memory_bank_size=8, bank_refresh_steps=1, bank_drift_probe=2)


def test_resume_equals_uninterrupted_and_bank_stays_out_of_the_model(tmp_path, encoder_dir):
    from datasets import Dataset

    path = encoder_dir()
    data = Dataset.from_list(toy_rows(40, num_negatives=1))
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}

    def run(out, resume=None, bank=12):
        model = st_model(path)
        loss = ContAccumLoss(model, memory_bank_size=bank, bank_hard_negatives=True)
        trainer = SentenceTransformerTrainer(model=model, args=_st_args(out, **common), train_dataset=data, loss=loss)
        trainer.train(resume_from_checkpoint=resume)
        return model, loss, trainer

    full_model, full_loss, full = run(tmp_path / "a")
    assert sorted(f for f in os.listdir(tmp_path / "a" / "checkpoint-2") if f.startswith("contaccum_bank")) == [
        "contaccum_bank_rank0.pt"]
    # resume_from_checkpoint=True picks output_dir's last checkpoint: copy the run, drop its end
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed_model, resumed_loss, resumed = run(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    losses = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 2]
    assert losses(full) == losses(resumed)
    sa, sb = full_loss.memory_bank.state_dict(), resumed_loss.memory_bank.state_dict()
    assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)

    full.save_model(str(tmp_path / "final"))  # the model folder: no bank, loadable as a plain model
    assert not any("contaccum" in f for _, _, files in os.walk(tmp_path / "final") for f in files)
    card = (tmp_path / "final" / "README.md").read_text()
    assert "ContAccumMultipleNegativesRankingLoss" in card and "memory_bank_size" in card and "kim2024contaccum" in card

    with pytest.raises(ValueError, match="same memory_bank_size"):
        run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"), bank=16)
    os.remove(tmp_path / "b" / "checkpoint-2" / "contaccum_bank_rank0.pt")
    with pytest.raises(FileNotFoundError, match="no memory bank state"):
        run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-2"))


def test_bank_refresh_resumes_exactly(tmp_path, encoder_dir):
    """The kept tokens travel in the checkpoint, and the resumed run refreshes at its first step (2) as the
    uninterrupted one does."""
    import shutil

    from datasets import Dataset

    path, data = encoder_dir(), Dataset.from_list(toy_rows(40))

    def run(out, resume=None):
        model = st_model(path)
        loss = ContAccumLoss(model, memory_bank_size=12, bank_refresh_steps=2)
        trainer = SentenceTransformerTrainer(model=model, args=_st_args(out, max_steps=4, save_strategy="steps",
                                                                        save_steps=2, learning_rate=1e-2),
                                             train_dataset=data, loss=loss)
        trainer.train(resume_from_checkpoint=resume)
        return model, loss

    full_model, full_loss = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    resumed_model, resumed_loss = run(tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), name
    sa, sb = full_loss.memory_bank.state_dict(), resumed_loss.memory_bank.state_dict()
    assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
    kept = [loss.bank_for(16).staleness.state_dict()["tokens"] for loss in (full_loss, resumed_loss)]
    assert set(kept[0]) == {"query", "passage"}  # the kept tokens travelled with the checkpoint
    assert all(torch.equal(a, b) for side in kept[0] for a, b in zip(kept[0][side], kept[1][side]))


def test_token_keys_identify_texts_whatever_the_padding(encoder_dir):
    model = st_model(encoder_dir())
    a = token_keys(tokenize(model, ["kilo lima", "mike", "kilo lima"]))
    b = token_keys(tokenize(model, ["a much longer text to widen the batch", "kilo lima"]))
    assert a[0] == a[2] == b[1] and a[0] != a[1] and a.dtype == torch.long
    left = tokenize(model, ["kilo lima", "mike"])
    shift = torch.zeros_like(left["input_ids"][:, :2])
    left = {"input_ids": torch.cat([shift, left["input_ids"]], 1),
            "attention_mask": torch.cat([shift, left["attention_mask"]], 1)}
    assert torch.equal(token_keys(left), a[:2])


def test_token_keys_are_the_keys_saved_banks_hold_and_make_no_copy_per_batch():
    """The keys of a fixed batch are pinned (a bank checkpointed by an earlier version holds keys made this way: other
    values would unmask duplicates after a resume), and the hash weights are made once per width and device, not
    copied from the host at every batch (on a GPU each such copy is a blocking transfer: a host sync)."""
    from hf_contaccum.data.keys import _hash_weights

    ids = torch.randint(0, 30522, (4, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [0] * 3 + [1] * 4, [1] + [0] * 6])
    assert token_keys({"input_ids": ids, "attention_mask": mask}).tolist() == [
        379284109595584993, 344638551425703622, 2502073164892734957, 3190199654010057021]
    assert token_keys({"input_ids": ids}).tolist() == [
        379284109595584993, 2477875426549377030, 3736775171876198385, 1063484502452631482]
    misses = _hash_weights.cache_info().misses
    for _ in range(3):
        token_keys({"input_ids": ids, "attention_mask": mask})
    assert _hash_weights.cache_info().misses == misses  # the same two tensors, already on the ids' device
    assert _hash_weights(2_147_483_647, 1, 7, ids.device).device == ids.device


def test_duplicate_positive_in_batch_is_masked(encoder_dir):
    model = st_model(encoder_dir())
    rows = toy_rows(4)
    rows[3]["positive"] = rows[1]["positive"]  # two anchors share a positive: not each other's negative
    feats = features(model, rows, ["query", "positive"])
    masked = ContAccumLoss(model)(copy.deepcopy(feats), None)
    plain = ContAccumLoss(model, mask_false_negatives=False)(copy.deepcopy(feats), None)
    assert masked < plain


def test_bad_input(encoder_dir):
    model = st_model(encoder_dir())
    with pytest.raises(ValueError, match="gives 1 column"):
        ContAccumLoss(model)(features(model, toy_rows(4), ["query"]), None)
    with pytest.raises(ValueError, match="smaller than one micro-batch of 4 pairs"):
        ContAccumLoss(model, memory_bank_size=2)(features(model, toy_rows(4), ["query", "positive"]), None)
    with pytest.raises(TypeError, match="loss whose bank it saves"):
        ContAccumBankCallback(MultipleNegativesRankingLoss(model))


def test_config_and_citation(encoder_dir):
    loss = ContAccumLoss(st_model(encoder_dir()), memory_bank_size=64, mini_batch_size=8)
    config = loss.get_config_dict()
    assert config["memory_bank_size"] == 64 and config["similarity_fct"] == "cos_sim" and config["scale"] == 20.0
    assert "kim2024contaccum" in loss.citation and "gao2021gradcache" in loss.citation


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, encoder_dir):
    import json
    import sys

    path = encoder_dir()
    config = {"rows": 24, "batch": 8, "steps": 3, "bank": 12}
    worker = os.path.join(os.path.dirname(__file__), "workers", "st_dist_worker.py")
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            worker, str(tmp_path), path, json.dumps(config)])
    result = torch.load(tmp_path / "st_dist.pt")
    assert result["checksums"][0] == result["checksums"][1]  # one global bank, identical on both ranks

    model = st_model(path)
    model.train()
    loss_fn = ContAccumLoss(model, memory_bank_size=12, bank_hard_negatives=True)
    rows = toy_rows(24, num_negatives=1)
    for step, expected in enumerate(result["steps"]):
        _, grads = grads_of(model, loss_fn, features(model, rows[step * 8:(step + 1) * 8],
                                                     ["query", "positive", "negative"]))
        assert grads.keys() == expected["grads"].keys()
        for name in grads:
            assert torch.allclose(grads[name], expected["grads"][name], atol=2e-5, rtol=1e-4), (step, name)
    bank = loss_fn.memory_bank
    assert result["checksums"][0][3:] == [bank.ptr, bank.fill]
    assert result["checksums"][0][0] == pytest.approx(float(bank.queries.double().sum()), rel=1e-5)


def test_collapse_guard_in_the_lifecycle(encoder_dir):
    from hf_contaccum import EmbeddingCollapseError

    loss = ContAccumLoss(st_model(encoder_dir()), memory_bank_size=8, collapse_patience=2)
    with pytest.warns(FutureWarning, match="no longer needed"):
        callback = ContAccumBankCallback(loss)  # the explicit option, still accepted
    core = loss.bank_for(16)
    same = torch.ones(4, 16, requires_grad=True)
    for step in range(2):
        core(same, same.detach() + 0.0, torch.arange(4)).backward()
        if step == 0:
            callback.on_step_end(None, None, _Control())
    with pytest.raises(EmbeddingCollapseError, match="collapsed: for 2 optimizer steps"):
        callback.on_step_end(None, None, _Control())


class _Control:
    should_save = False


def test_a_non_finite_loss_stops_sentence_transformers_training_before_its_step(tmp_path, encoder_dir):
    """With the callback, finiteness is read once per optimizer step (before the optimizer), not per
    micro-batch; training still stops before the step is applied."""
    from datasets import Dataset

    model = st_model(encoder_dir())
    with torch.no_grad():
        model[0].auto_model.embeddings.word_embeddings.weight.fill_(float("nan"))
    loss = ContAccumLoss(model, memory_bank_size=8)
    trainer = SentenceTransformerTrainer(model=model, args=_st_args(tmp_path), loss=loss,
                                         train_dataset=Dataset.from_list(toy_rows(24)))
    with pytest.raises(FloatingPointError, match="a micro-batch of this optimizer step had a non-finite"):
        trainer.train()
    assert loss.bank_for(16).finite.deferred and trainer.state.global_step == 0


def test_callback_refuses_cuda_graphs_with_accumulation_before_training(tmp_path, encoder_dir):
    from datasets import Dataset

    model = st_model(encoder_dir())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = ContAccumLoss(model, memory_bank_size=8)
    trainer = SentenceTransformerTrainer(model=model, args=_st_args(tmp_path, torch_compile_mode="reduce-overhead"),
                                         train_dataset=Dataset.from_list(toy_rows(16)), loss=loss)
    with pytest.raises(ValueError, match=r"reduce-overhead.*gradient_accumulation_steps=2.*overwrite"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_callback_refuses_a_trainer_that_would_divide_by_the_accumulation_steps_twice(tmp_path, encoder_dir,
                                                                                      monkeypatch):
    from datasets import Dataset

    accelerate_told_the_accumulation_steps(monkeypatch)
    model = st_model(encoder_dir())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = ContAccumLoss(model, memory_bank_size=8)
    trainer = SentenceTransformerTrainer(model=model, args=_st_args(tmp_path), train_dataset=Dataset.from_list(toy_rows(16)),
                                         loss=loss)
    with pytest.raises(RuntimeError, match=r"divides every loss by 2.*5\.5\.4"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path, encoder_dir):
    """torch_compile=True through SentenceTransformerTrainer with this loss (a bank with banked hard negatives,
    gradient accumulation): the same losses and parameters as eager mode (no dropout: compiled code draws other
    dropout masks)."""
    from datasets import Dataset

    path, runs = encoder_dir(), []
    for compiled in (False, True):
        torch.manual_seed(0)  # the pooler the checkpoint lacks is initialised alike (it is not trained on)
        model = st_model(path)
        loss = ContAccumLoss(model, memory_bank_size=10, bank_hard_negatives=True)
        trainer = SentenceTransformerTrainer(model=model, args=_st_args(tmp_path / str(compiled), torch_compile=compiled),
                                             train_dataset=Dataset.from_list(toy_rows(24, num_negatives=1)), loss=loss)
        trainer.train()
        runs.append(trainer)
    assert len([h for h in runs[0].state.log_history if "loss" in h]) == 3
    assert_trained_alike(*runs, lambda t: t.loss.memory_bank.passages)
