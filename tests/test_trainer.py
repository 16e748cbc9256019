"""ContAccumTrainer against independent hand-written training loops, logging, evaluation."""
import copy
import os

import pytest
import torch
from helpers.data import toy_rows
from helpers.models import tiny_model
from helpers.references import manual_contaccum, manual_gradient_accumulation
from helpers.trainers import accelerate_told_the_accumulation_steps, trainer_args

from hf_contaccum import ContAccumTrainer, ContrastiveCollator


@pytest.mark.parametrize("k", [1, 3])
def test_no_bank_equals_plain_gradient_accumulation(tmp_path, tokenizer, toy_dataset, k):
    """memory_bank_size=0: same parameters after 3 optimizer steps as GradAccum (K=1: in-batch InfoNCE)."""
    ds = toy_dataset(n=4 * k * 3)
    model = tiny_model()
    reference = manual_gradient_accumulation(copy.deepcopy(model), tokenizer, list(ds), 4, k, 3, 1e-3)
    args = trainer_args(tmp_path, gradient_accumulation_steps=k, memory_bank_size=0, mask_false_negatives=False)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 3
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_trainer_with_bank_equals_literal_contaccum(tmp_path, tokenizer, toy_dataset, small_chunks):
    ds = toy_dataset(n=4 * 2 * 4, num_negatives=1)
    model = tiny_model()
    reference, ref_losses = manual_contaccum(copy.deepcopy(model), tokenizer, list(ds), 4, 2, 4, 1e-3, 10, 1)
    small_chunks(3)
    args = trainer_args(tmp_path, gradient_accumulation_steps=2, max_steps=4, memory_bank_size=10,
                        mask_false_negatives=False)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.train()
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    expected = [sum(ref_losses[i:i + 2]) / 2 for i in range(0, 8, 2)]
    assert logged == pytest.approx(expected, rel=1e-4)  # the Trainer divided by K exactly once


def _assert_trains_as(trainer, reference, ref_losses, stale):
    """trainer (K = 2) ends with the reference's parameters, not the stale run's, logging the reference's losses."""
    trainer.train()
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(trainer.model.parameters(), stale.parameters()))
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([sum(ref_losses[i:i + 2]) / 2 for i in range(0, len(ref_losses), 2)], rel=1e-4)


@pytest.mark.parametrize("one_tower_call", [False, True])
def test_bank_refresh_equals_literal_contaccum_re_encoding_the_bank(tmp_path, tokenizer, toy_dataset, one_tower_call):
    """bank_refresh_steps=1: before every optimizer step each banked pair is encoded again by the current
    encoder; against the literal loop re-encoding them one by one from their texts (the refresh goes through
    `embed`, so one_tower_call encodes the banked queries and passages in one call too)."""
    ds = toy_dataset(n=4 * 2 * 5)
    model = tiny_model()
    reference, ref_losses = manual_contaccum(copy.deepcopy(model), tokenizer, list(ds), 4, 2, 5, 1e-2, 12, 0,
                                              refresh=True)
    stale, _ = manual_contaccum(copy.deepcopy(model), tokenizer, list(ds), 4, 2, 5, 1e-2, 12, 0)
    args = trainer_args(tmp_path, gradient_accumulation_steps=2, max_steps=5, memory_bank_size=12,
                        mask_false_negatives=False, learning_rate=1e-2, bank_refresh_steps=1,
                        one_tower_call=one_tower_call)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    _assert_trains_as(trainer, reference, ref_losses, stale)
    # every slot keeps the tokens of one training pair (as the collator cut them), query and positive together
    collate, bank = ContrastiveCollator(tokenizer, 16, 24), trainer.memory_bank
    staleness = trainer.contrastive_loss.staleness
    pairs = {tuple(b["query_input_ids"][0].tolist()): tuple(b["passage_input_ids"][0].tolist())
             for b in (collate([row]) for row in ds)}
    kept = [tuple(tuple(staleness.token_features(slice(s, s + 1), side)["input_ids"][0].tolist())
                  for side in ("query", "passage")) for s in range(bank.fill)]
    assert len(kept) == 12 and all(pairs[query] == passage for query, passage in kept)


@pytest.mark.parametrize("control", [{"bank_refresh_steps": 2}, {"bank_drift_probe": 3}])
def test_bank_refresh_and_drift_probe_resume_exactly_and_refuse_what_they_cannot_do(tmp_path, tokenizer,
                                                                                     toy_dataset, control):
    """The refresh's kept tokens, and the probe's tokens and last means, are saved with the bank: a run resumed
    mid-way equals the whole run."""
    ds = toy_dataset(40)
    common = {"memory_bank_size": 12, "gradient_accumulation_steps": 2, "max_steps": 4, "save_strategy": "steps",
              "save_steps": 2, "train_sampling_strategy": "random", "learning_rate": 1e-2, **control}
    full = ContAccumTrainer(model=tiny_model(dropout=0.1), args=trainer_args(tmp_path / "a", **common),
                            train_dataset=ds, processing_class=tokenizer)
    full.train()
    resumed = ContAccumTrainer(model=tiny_model(seed=5, dropout=0.1), args=trainer_args(tmp_path / "b", **common),
                               train_dataset=ds, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(full.memory_bank.passages, resumed.memory_bank.passages)
    full.create_model_card()
    card = (tmp_path / "a" / "out" / "README.md").read_text()
    if "bank_refresh_steps" in control:
        assert torch.equal(full.contrastive_loss.staleness.tokens["query"][0],
                           resumed.contrastive_loss.staleness.tokens["query"][0])
        assert "| bank refresh (banked pairs encoded again every N steps) | 2 |" in card
    else:
        assert torch.equal(full.contrastive_loss.staleness.means, resumed.contrastive_loss.staleness.means)
        assert "| bank drift probe (pairs whose mean change moves the bank each step) | 3 |" in card
    (name, _), = control.items()
    with pytest.raises(ValueError, match=f"{name} must be >= 0"):
        trainer_args(tmp_path, **{name: -1})
    with pytest.raises(ValueError, match="memory_bank_size is 0"):
        trainer_args(tmp_path, memory_bank_size=0, **control)
    with pytest.raises(ValueError, match="not banked hard negatives"):
        trainer_args(tmp_path, memory_bank_size=8, bank_hard_negatives=True, bank_refresh_steps=1)


@pytest.mark.parametrize("similarity", ["dot", "cos"])
def test_bank_drift_probe_equals_literal_contaccum_moving_the_bank(tmp_path, tokenizer, toy_dataset, similarity):
    """bank_drift_probe=3: before every optimizer step the first 3 pairs are encoded without dropout and every banked
    vector moves by their mean change since the last step; against the literal loop (probe pairs encoded one by
    one, the bank as python lists). Then, with dropout, the probe is encoded in eval mode."""
    ds = toy_dataset(n=4 * 2 * 5)
    model = tiny_model()
    common = (tokenizer, list(ds), 4, 2, 5, 1e-2, 12, 0)
    reference, ref_losses = manual_contaccum(copy.deepcopy(model), *common, drift_probe=3, cos=similarity == "cos")
    stale, _ = manual_contaccum(copy.deepcopy(model), *common, cos=similarity == "cos")
    args = trainer_args(tmp_path, gradient_accumulation_steps=2, max_steps=5, memory_bank_size=12,
                        mask_false_negatives=False, learning_rate=1e-2, bank_drift_probe=3, similarity=similarity,
                        temperature=1.0)  # the literal loop divides by no temperature
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    _assert_trains_as(trainer, reference, ref_losses, stale)

    class Recording(ContAccumTrainer):
        def embed(self, model, features):
            modes.append((len(features["query"]["input_ids"]), model.training))
            return super().embed(model, features)

    modes = []
    Recording(model=tiny_model(dropout=0.1), args=args, train_dataset=ds, processing_class=tokenizer).train()
    assert modes[:3] == [(3, False), (4, True), (4, True)] and modes.count((3, False)) == 5  # one probe per step
    assert all(training for rows, training in modes if rows == 4)
    with pytest.raises(ValueError, match="set one of them to 0"):
        trainer_args(tmp_path, memory_bank_size=8, bank_refresh_steps=1, bank_drift_probe=4)


def test_logs_bank_statistics(tmp_path, tokenizer, toy_dataset):
    args = trainer_args(tmp_path, memory_bank_size=6, gradient_accumulation_steps=2, max_steps=3)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(24), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["bank_fill"] for h in logs] == [6, 6, 6]
    # step 1: micro-batches see 0 then 4 banked columns -> (3 + 7) / 2 negatives
    assert logs[0]["negatives_per_query"] == pytest.approx(5.0)
    assert logs[-1]["negatives_per_query"] == pytest.approx(9.0)
    assert all(h["grad_norm_ratio"] > 0 for h in logs)


def test_evaluate_leaves_bank_bit_identical(tmp_path, tokenizer, toy_dataset):
    from hf_contaccum.evaluation import RetrievalEvaluator

    ds = toy_dataset(24)
    rows = list(ds)
    corpus = {f"d{i}": r["positive"] for i, r in enumerate(rows)}
    evaluator = RetrievalEvaluator({f"q{i}": r["query"] for i, r in enumerate(rows)}, corpus,
                                   {f"q{i}": {f"d{i}": 1} for i in range(len(rows))}, k_values=(1, 5),
                                   show_progress=False)
    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=2, eval_strategy="steps", eval_steps=1)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=ds, eval_dataset=toy_dataset(8, seed=3),
                               processing_class=tokenizer, evaluator=evaluator)
    trainer.train()
    before = trainer.memory_bank.state_dict()
    metrics = trainer.evaluate()
    after = trainer.memory_bank.state_dict()
    assert "eval_loss" in metrics and "eval_ndcg@5" in metrics
    assert any("eval_ndcg@5" in h for h in trainer.state.log_history)  # eval_steps ran the evaluator in training
    for key in before:
        if isinstance(before[key], torch.Tensor):
            assert torch.equal(before[key], after[key]), key
        else:
            assert before[key] == after[key], key


def test_missing_and_misnamed_columns(tmp_path, tokenizer):
    from datasets import Dataset

    ds = Dataset.from_list([{"question_text": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="no query and no positive column.*rename_column"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path), train_dataset=ds, processing_class=tokenizer)


@pytest.mark.parametrize("bad, match", [("", "is empty"), ("   ", "is empty"), (None, r"is missing \(null\)"),
                                        (3, "holds int 3, expected text")])
def test_bad_texts_are_found_before_training(tmp_path, tokenizer, bad, match):
    """Found at construction, with the dataset row (not the batch row), the column, the count and the fix."""
    from datasets import Dataset

    rows = toy_rows(30)
    rows[5]["positive"] = rows[25]["positive"] = bad
    ds = Dataset.from_list(rows) if not isinstance(bad, int) else rows  # arrow cannot mix int and str
    with pytest.raises(ValueError, match=f"train_dataset row 5, column 'positive': {match} "
                                         r"\(2 rows affected, e.g. rows 5, 25\). Fix: .*dataset.filter"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, max_steps=1), train_dataset=ds,
                         processing_class=tokenizer)


def test_negative_bank_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="memory_bank_size is a number of samples"):
        trainer_args(tmp_path, memory_bank_size=-1)
    with pytest.raises(ValueError, match="make memory_bank_size at least as large"):
        trainer_args(tmp_path, memory_bank_size=4, query_memory_bank_size=8)


def test_nan_loss_stops_with_message(tmp_path, tokenizer, toy_dataset):
    model = tiny_model()
    with torch.no_grad():
        model.query_encoder.embeddings.word_embeddings.weight.fill_(float("nan"))
    trainer = ContAccumTrainer(model=model, args=trainer_args(tmp_path, max_steps=1), train_dataset=toy_dataset(8),
                               processing_class=tokenizer)
    with pytest.raises(FloatingPointError, match="lower learning_rate"):
        trainer.train()


def test_a_nan_micro_batch_stops_its_step_before_the_optimizer_applies_it(tmp_path, tokenizer, toy_dataset):
    """Finiteness is read once per optimizer step (no host sync per micro-batch), and a non-finite
    micro-batch anywhere in the step still stops training before that step is applied."""
    class NanInSecondMicroBatch(ContAccumTrainer):
        calls = 0

        def embed(self, model, features):
            out = super().embed(model, features)
            self.calls += 1
            return {k: v * float("nan") for k, v in out.items()} if self.calls == 2 else out

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = trainer_args(tmp_path, max_steps=2, gradient_accumulation_steps=3, memory_bank_size=8)
    trainer = NanInSecondMicroBatch(model=model, args=args, train_dataset=toy_dataset(24), processing_class=tokenizer)
    with pytest.raises(FloatingPointError, match="non-finite contrastive loss"):
        trainer.train()
    assert trainer.contrastive_loss.finite.deferred and not args.logging_nan_inf_filter
    assert trainer.calls == 3 and trainer.state.global_step == 0  # the whole step ran, and was not applied
    assert all(torch.equal(value, model.state_dict()[name].cpu()) for name, value in before.items())


def test_reset_bank_each_step(tmp_path, tokenizer, toy_dataset):
    args = trainer_args(tmp_path, memory_bank_size=16, gradient_accumulation_steps=2, max_steps=2,
                        reset_bank_each_step=True)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(16), processing_class=tokenizer)
    trainer.train()
    assert len(trainer.memory_bank) == 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["negatives_per_query"] for h in logs] == [5.0, 5.0]  # (3 + 7) / 2: past steps never seen


def test_resume_continues_exactly(tmp_path, tokenizer, toy_dataset):
    """Stopped at step 2 and resumed == uninterrupted: losses, parameters and bank."""
    ds = toy_dataset(40, num_negatives=1)
    common = {"memory_bank_size": 12, "bank_hard_negatives": True, "gradient_accumulation_steps": 2, "max_steps": 4,
              "save_strategy": "steps", "save_steps": 2, "train_sampling_strategy": "random"}
    full = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / "a", **common), train_dataset=ds,
                            processing_class=tokenizer)
    full.train()
    resumed = ContAccumTrainer(model=tiny_model(seed=5), args=trainer_args(tmp_path / "b", **common),
                               train_dataset=ds, processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    loss = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h and h["step"] > 2]
    assert loss(full) == loss(resumed)
    sa, sb = full.memory_bank.state_dict(), resumed.memory_bank.state_dict()
    assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)


def test_one_evaluate_is_one_log_line_and_one_on_evaluate(tmp_path, tokenizer, toy_dataset):
    """EarlyStoppingCallback on a retrieval metric sees it in the only on_evaluate of each evaluation."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    from hf_contaccum.evaluation import RetrievalEvaluator

    rows = list(toy_dataset(24))
    evaluator = RetrievalEvaluator({f"q{i}": r["query"] for i, r in enumerate(rows)},
                                   {f"d{i}": r["positive"] for i, r in enumerate(rows)},
                                   {f"q{i}": {f"d{i}": 1} for i in range(len(rows))}, k_values=(1, 10),
                                   show_progress=False)
    seen = []

    class Record(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(dict(metrics))

    for eval_dataset in (toy_dataset(8, seed=3), None):  # with an eval loss, and the evaluator alone
        seen.clear()
        args = trainer_args(tmp_path, memory_bank_size=8, max_steps=4, eval_strategy="steps", eval_steps=2,
                            save_strategy="steps", save_steps=2, metric_for_best_model="eval_ndcg@10",
                            greater_is_better=True, load_best_model_at_end=True)
        trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(24),
                                   eval_dataset=eval_dataset, processing_class=tokenizer, evaluator=evaluator,
                                   callbacks=[EarlyStoppingCallback(early_stopping_patience=5), Record()])
        trainer.train()
        assert len(seen) == 2 and all("eval_ndcg@10" in m for m in seen)
        assert ("eval_loss" in seen[0]) == (eval_dataset is not None)
        eval_logs = [h for h in trainer.state.log_history if any(k.startswith("eval_") for k in h)]
        assert len(eval_logs) == 2 and all("eval_ndcg@10" in h for h in eval_logs)
        metrics = trainer.evaluate()
        assert len(seen) == 3 and "eval_ndcg@10" in metrics and "eval_ndcg@10" in seen[-1]


def test_gradcache_runs_the_trainers_own_training_step(tmp_path, tokenizer, toy_dataset):
    """optimizer.train() (schedule-free optimizers) is called on every micro-step, GradCache or not."""
    calls = []

    class TrainEvalAdamW(torch.optim.AdamW):
        def train(self):
            calls.append("train")

        def eval(self):
            calls.append("eval")

    for chunk in (None, 2):
        calls.clear()
        model = tiny_model()
        args = trainer_args(tmp_path, memory_bank_size=8, gradcache_chunk_size=chunk, max_steps=2)
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(16), processing_class=tokenizer,
                                   optimizers=(TrainEvalAdamW(model.parameters(), lr=1e-3), None))
        trainer.train()
        assert calls.count("train") >= 2 * 2, (chunk, calls)  # max_steps x K micro-steps


def test_bank_smaller_than_a_micro_batch_and_no_tokenizer(tmp_path, tokenizer, toy_dataset):
    with pytest.raises(ValueError, match=r"smaller than one micro-batch of 4 pairs.*memory_bank_size >= 4"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, memory_bank_size=3),
                         train_dataset=toy_dataset(8), processing_class=tokenizer)
    with pytest.raises(ValueError, match="no tokenizer: pass processing_class"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path), train_dataset=toy_dataset(8))


def test_a_trainer_that_would_divide_by_the_accumulation_steps_twice_is_refused(tmp_path, tokenizer, toy_dataset,
                                                                                 monkeypatch):
    accelerate_told_the_accumulation_steps(monkeypatch)
    with pytest.raises(RuntimeError, match=r"gradient_accumulation_steps=2.*divides every loss by 2.*5\.5\.4"):
        ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path), train_dataset=toy_dataset(16),
                         processing_class=tokenizer)
    # one micro-batch per step: nothing is divided, by either
    ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path, gradient_accumulation_steps=1),
                     train_dataset=toy_dataset(16), processing_class=tokenizer)


def test_resume_with_another_bank_size_is_refused(tmp_path, tokenizer, toy_dataset):
    common = {"gradient_accumulation_steps": 2, "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / "a", memory_bank_size=8, **common),
                     train_dataset=toy_dataset(24), processing_class=tokenizer).train()
    resumed = ContAccumTrainer(model=tiny_model(), args=trainer_args(tmp_path / "b", memory_bank_size=16, **common),
                               train_dataset=toy_dataset(24), processing_class=tokenizer)
    with pytest.raises(ValueError, match="resume with the same memory_bank_size"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))


def test_defaults_show_bank_statistics_in_a_short_run_and_skip_cpu_pinning(tmp_path, tokenizer, toy_dataset):
    from hf_contaccum import ContAccumTrainingArguments

    args = ContAccumTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                      gradient_accumulation_steps=2, max_steps=3, memory_bank_size=8,
                                      report_to="none", use_cpu=True, disable_tqdm=True)
    assert not args.dataloader_pin_memory  # training on the CPU: pinning only prints a warning
    on_gpu = ContAccumTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=False)
    assert on_gpu.dataloader_pin_memory == torch.cuda.is_available()
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(24), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("bank_fill" in h and "negatives_per_query" in h for h in logs)


def test_collapse_guard_stops_before_a_collapsed_checkpoint(tmp_path, tokenizer, toy_dataset):
    """Forced collapse (every embedding the same vector): stopped within 50 steps, before that step's checkpoint."""
    from hf_contaccum import EmbeddingCollapseError

    class Collapsed(ContAccumTrainer):
        def embed(self, model, features):
            out = super().embed(model, features)
            return {side: v * 0.0 + 1.0 for side, v in out.items()}  # one vector for every text

    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=60, save_strategy="steps", save_steps=5)
    trainer = Collapsed(model=tiny_model(), args=args, train_dataset=toy_dataset(48), processing_class=tokenizer)
    with pytest.raises(EmbeddingCollapseError, match="collapsed: for 10 optimizer steps.*memory_bank_size about"):
        trainer.train()
    assert trainer.state.global_step == 10
    checkpoints = os.listdir(tmp_path / "out")
    assert "checkpoint-5" in checkpoints and "checkpoint-10" not in checkpoints
    args = trainer_args(tmp_path / "off", memory_bank_size=8, max_steps=12, collapse_patience=0)
    Collapsed(model=tiny_model(), args=args, train_dataset=toy_dataset(48), processing_class=tokenizer).train()


def test_separate_towers_log_the_papers_tower_ratio(tmp_path, tokenizer, toy_dataset):
    args = trainer_args(tmp_path, memory_bank_size=8, max_steps=2)
    trainer = ContAccumTrainer(model=tiny_model(shared=False), args=args, train_dataset=toy_dataset(16),
                               processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["grad_norm_ratio_towers"] > 0 and h["grad_norm_ratio"] > 0 for h in logs)


def test_evaluating_before_training_leaves_the_run_unchanged(tmp_path, tokenizer, toy_dataset):
    """The quick start evaluates, then trains: the evaluation must not draw from the RNG that dropout uses."""
    from hf_contaccum.evaluation import RetrievalEvaluator

    rows = list(toy_dataset(12))
    evaluator = RetrievalEvaluator({f"q{i}": r["query"] for i, r in enumerate(rows)},
                                   {f"d{i}": r["positive"] for i, r in enumerate(rows)},
                                   {f"q{i}": {f"d{i}": 1} for i in range(len(rows))}, k_values=(1,),
                                   show_progress=False)
    losses = []
    for evaluate_first in (False, True):
        trainer = ContAccumTrainer(model=tiny_model(dropout=0.2), args=trainer_args(tmp_path, memory_bank_size=8),
                                   train_dataset=toy_dataset(24), processing_class=tokenizer, evaluator=evaluator)
        if evaluate_first:
            trainer.evaluate()
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == losses[1]


def test_memory_bank_size_auto_is_the_pairs_of_one_optimizer_step(tmp_path):
    from transformers import HfArgumentParser

    from hf_contaccum import ContAccumTrainingArguments

    assert trainer_args(tmp_path, memory_bank_size="auto", gradient_accumulation_steps=3).memory_bank_size == 12
    (parsed,) = HfArgumentParser(ContAccumTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--memory_bank_size", "auto", "--per_device_train_batch_size", "8",
         "--gradient_accumulation_steps", "16", "--use_cpu"])
    assert parsed.memory_bank_size == 128 and parsed.passage_bank_size == 128
    (parsed,) = HfArgumentParser(ContAccumTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--memory_bank_size", "512", "--use_cpu"])
    assert parsed.memory_bank_size == 512
    with pytest.raises(ValueError, match="number of samples or 'auto'"):
        trainer_args(tmp_path, memory_bank_size="big")
    # "auto" is the default, from Python and from the command line
    default = ContAccumTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                         gradient_accumulation_steps=8, use_cpu=True)
    assert default.memory_bank_size == 32
    (parsed,) = HfArgumentParser(ContAccumTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--per_device_train_batch_size", "8", "--use_cpu"])
    assert parsed.memory_bank_size == 8


def test_tokenised_once_gives_the_same_batches_and_training(tmp_path, tokenizer, toy_dataset):
    from hf_contaccum.data.collator import tokenize_once

    ds = toy_dataset(12, num_negatives=2)
    collate = ContrastiveCollator(tokenizer, 16, 24, max_hard_negatives=2)
    encoded = tokenize_once(ds, collate)
    for start in (0, 4, 8):
        on_the_fly, padded = collate(list(ds)[start:start + 4]), collate(list(encoded)[start:start + 4])
        assert on_the_fly.keys() == padded.keys()
        assert all(torch.equal(on_the_fly[k], padded[k]) for k in on_the_fly), start
    losses = []
    for once in (False, True):
        args = trainer_args(tmp_path, memory_bank_size=8, bank_hard_negatives=True, tokenize_once=once)
        trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=toy_dataset(24, num_negatives=1),
                                   processing_class=tokenizer)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == losses[1]


def test_retired_and_renamed_arguments(tmp_path):
    """Retired knobs: their old default is accepted for one release, any other value refused with the reason;
    passage_memory_bank_size maps onto memory_bank_size (and the query bank keeps the old memory_bank_size)."""
    from transformers import HfArgumentParser

    from hf_contaccum import ContAccumTrainingArguments

    for name, value in (("bank_weight", 0.25), ("bank_warmup_steps", 20), ("bank_chunk_size", 8)):
        with pytest.raises(ValueError, match=f"{name} was retired in hf_contaccum 0.2.0"):
            trainer_args(tmp_path, **{name: value})
    trainer_args(tmp_path, bank_weight=1.0, bank_warmup_steps=0)
    with pytest.warns(FutureWarning, match="passage_memory_bank_size is retired"):
        args = trainer_args(tmp_path, memory_bank_size=8, passage_memory_bank_size=16)
    assert (args.memory_bank_size, args.query_bank_size) == (16, 8)
    help_text = HfArgumentParser(ContAccumTrainingArguments).format_help()
    assert "--memory_bank_size" in help_text and "--bank_weight" not in help_text


@pytest.mark.parametrize("gradcache_chunk_size", [None, 2])
def test_one_tower_call_trains_like_two(tmp_path, tokenizer, toy_dataset, gradcache_chunk_size):
    """Queries and passages through the shared tower as one padded batch: same losses, parameters and bank."""
    results = []
    for one_call in (False, True):
        model = tiny_model()
        calls = []
        model.query_encoder.register_forward_hook(
            lambda module, args, kwargs, out, calls=calls: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
        args = trainer_args(tmp_path / str(one_call), memory_bank_size=8, bank_hard_negatives=True, max_steps=3,
                            one_tower_call=one_call, gradcache_chunk_size=gradcache_chunk_size)
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=toy_dataset(24, num_negatives=1),
                                   processing_class=tokenizer)
        trainer.train()
        results.append((trainer, calls))
    (two, two_calls), (one, one_calls) = results
    if gradcache_chunk_size is None:  # 6 micro-steps: 12 calls of 4 queries or 8 passages, then 6 calls of 12
        assert sorted({s[0] for s in two_calls}) == [4, 8] and len(two_calls) == 12
        assert {s[0] for s in one_calls} == {12} and len(one_calls) == 6
    else:
        assert len(one_calls) < len(two_calls)  # the chunk pairs a query and a passage chunk share a call
    assert [h["loss"] for h in one.state.log_history if "loss" in h] == pytest.approx(
        [h["loss"] for h in two.state.log_history if "loss" in h], rel=1e-5)
    for (name, a), (_, b) in zip(two.model.named_parameters(), one.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.allclose(two.memory_bank.passages, one.memory_bank.passages, atol=1e-6)


def test_one_tower_call_keeps_every_texts_embedding(tokenizer):
    """Masked positions appended at the end change no embedding, whatever the pooling (and for decoders, see
    test_adapters_decoders_prompts)."""
    from hf_contaccum.model.towers import stack_padded as _stack_padded

    for pooling in ("mean", "cls", "last"):
        model = tiny_model(pooling=pooling).eval()
        batch = ContrastiveCollator(tokenizer, 16, 24)(toy_rows(5, num_negatives=1))
        features = {key: batch[key] for key in batch if key.endswith(("input_ids", "attention_mask", "token_type_ids"))}
        assert features["query_input_ids"].shape[1] != features["passage_input_ids"].shape[1]
        with torch.no_grad():
            two, one = model(**features), model(**features, one_tower_call=True)
        assert torch.allclose(one.query_embeddings, two.query_embeddings, atol=1e-6), pooling
        assert torch.allclose(one.passage_embeddings, two.passage_embeddings, atol=1e-6), pooling
    ids, mask, types = _stack_padded([torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)],
                                     [torch.ones(2, 3), torch.ones(1, 5)], [None, None])
    assert ids.shape == (3, 5) and types is None and mask[:2, 3:].sum() == 0 and mask[2].sum() == 5


def test_one_tower_call_needs_a_shared_tower(tmp_path, tokenizer, toy_dataset):
    with pytest.raises(ValueError, match="one_tower_call=True needs a BiEncoder with one shared tower"):
        ContAccumTrainer(model=tiny_model(shared=False), args=trainer_args(tmp_path, one_tower_call=True),
                         train_dataset=toy_dataset(8), processing_class=tokenizer)


@pytest.mark.parametrize("one_tower_call", [False, True])
def test_a_trainer_micro_step_reads_nothing_from_the_device_in_our_code(tmp_path, tokenizer, one_tower_call):
    """Through the Trainer's own training_step (embed, loss, backward, enqueue, cache refresh, statistics):
    no op in this library reads a device value on the host. (transformers' SDPA mask check reads one per tower
    call when the batch has padding: its own, outside this library; one_tower_call makes it one per micro-step.)"""
    from datasets import Dataset
    from helpers.syncs import RecordSyncingOps

    import hf_contaccum

    library = os.path.dirname(hf_contaccum.__file__)

    args = trainer_args(tmp_path, memory_bank_size=16, bank_hard_negatives=True, one_tower_call=one_tower_call)
    trainer = ContAccumTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_list(toy_rows(32, 1)),
                               processing_class=tokenizer)
    trainer.contrastive_loss.defer_finite_check_to_step()  # as the trainer does at train begin
    trainer.current_gradient_accumulation_steps = 2
    batches = [trainer._prepare_inputs(trainer.data_collator(toy_rows(4, 1, seed=s))) for s in range(10)]
    for batch in batches[:4]:  # the bank fills, its cache is built
        trainer.training_step(trainer.model, batch)
    recorder = RecordSyncingOps()
    with recorder:
        for batch in batches[4:]:
            trainer.training_step(trainer.model, batch)
    ours = [read for read in recorder.seen if read.split(" in ")[1].startswith(library)]
    assert ours == [], ours
