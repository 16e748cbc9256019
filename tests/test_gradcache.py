"""GradCache mode: exact gradients with dropout on, and the hybrid with a bank."""
import copy

import pytest
import torch
from helpers.models import tiny_model
from helpers.references import chunked_reference_grads, naive_contaccum_loss
from helpers.trainers import on_device, trainer_args

from hf_contaccum import ContAccumTrainer, ContrastiveCollator


def _reference_grads(model, batch, seed, k):
    """Every chunk encoded WITH a graph (same chunk order and seed as GradCache), one loss, one backward."""
    torch.manual_seed(seed)
    model.train()
    n, h = batch["hard_negative_keys"].shape
    out = model(**{key: v for key, v in batch.items() if key.endswith(("input_ids", "attention_mask", "token_type_ids"))})
    q, p, hn = out.query_embeddings, out.passage_embeddings[:n], out.passage_embeddings[n:].view(n, h, -1)
    empty = q.new_zeros(0, q.shape[1])
    loss = naive_contaccum_loss(q, p, hn, empty, empty, None) / k
    loss.backward()
    return {name: prm.grad.clone() for name, prm in model.named_parameters() if prm.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3, 18])
def test_gradcache_gradients_equal_full_batch(tmp_path, tokenizer, toy_dataset, chunk):
    """With dropout on: chunk = 18 (6 queries, 18 passages) is one forward; smaller chunks (per column:
    chunks of queries, chunks of passages) replay the same dropout masks."""
    ds = toy_dataset(6, num_negatives=2)
    batch = on_device(ContrastiveCollator(tokenizer, 16, 24)(list(ds)))
    model = tiny_model(dropout=0.2)
    args = trainer_args(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2, memory_bank_size=0,
                        mask_false_negatives=False, gradcache_chunk_size=chunk)
    trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 2
    if chunk == 18:
        reference = _reference_grads(copy.deepcopy(model), batch, seed=7, k=2)
    else:  # the reference runs GradCache's forward calls with a graph, in order, from the same seed
        reference = chunked_reference_grads(trainer, copy.deepcopy(model), batch, chunk, seed=7, k=2)
    torch.manual_seed(7)
    loss = trainer.training_step(model, batch)
    assert loss.item() > 0
    assert len(reference) > 10
    for name, prm in model.named_parameters():
        if name in reference:
            assert torch.allclose(prm.grad, reference[name], atol=1e-6, rtol=1e-4), name
        else:
            assert prm.grad is None, name


def test_hybrid_with_chunk_equal_to_batch_equals_contaccum(tmp_path, tokenizer, toy_dataset):
    ds = toy_dataset(24, num_negatives=1)
    results = []
    for chunk in (None, 4, 2):
        model = tiny_model(dropout=0.0)
        args = trainer_args(tmp_path / str(chunk), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                            max_steps=3, memory_bank_size=6, bank_hard_negatives=True, gradcache_chunk_size=chunk)
        trainer = ContAccumTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
        trainer.train()
        results.append((model, [h["loss"] for h in trainer.state.log_history if "loss" in h],
                        trainer.memory_bank.state_dict()))
    (plain, plain_losses, plain_bank) = results[0]
    for model, losses, bank in results[1:]:
        assert losses == pytest.approx(plain_losses, rel=1e-5)  # logged loss scaled once, as without GradCache
        for (name, a), (_, b) in zip(plain.named_parameters(), model.named_parameters()):
            assert torch.allclose(a, b, atol=1e-6), name
        assert torch.allclose(plain_bank["queries"], bank["queries"], atol=1e-6)


def test_bad_chunk_size(tmp_path):
    with pytest.raises(ValueError, match="gradcache_chunk_size"):
        trainer_args(tmp_path, gradcache_chunk_size=0)
