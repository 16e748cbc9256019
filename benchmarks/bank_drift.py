"""How stale is a banked vector? Embedding drift over optimizer steps, measured in the logits a bank feeds.

Trains all-MiniLM-L6-v2 with ContAccum at the staleness benchmark's setting (N_total 128 = 8 x 16, N_mem =
N_total, lr 5e-5 with 10 % warm-up then linear decay, cosine with tau 0.05) on a real task, and after every
optimizer step encodes a fixed probe of training pairs (eval mode, no gradient). A bank entry written a steps
ago holds the passage as the encoder of a steps ago saw it; for every age a this compares those vectors
with the same passages encoded now, as a current query sees them:

  cos          cosine of the passage's stale and current vectors
  logit error  |q_now . (p_then - p_now)| / tau, over every probe query and every other probe passage (the
               negatives a bank supplies): how far a stale negative's logit is from the true one
  spread       the standard deviation of a query's logits over the other probe passages (fresh): the scale on
               which negatives are told apart; error / spread is the staleness in that scale
  shift        the signed mean of the same differences, q_now . (p_then - p_now) / tau: below 0 when every
               stale negative scores lower than its current self, i.e. the encoder has moved its current vectors
               away from where the banked ones sit, which lowers the loss without telling passages apart
  dropout      the same logit error between two train-mode encodings of the probe by the final encoder: the
               noise every vector in a training step carries anyway (current rows and columns included)

    python -m benchmarks.bank_drift --task wordnet        # ~10 min on 2 CPU cores
    python -m benchmarks.bank_drift --encoder scratch --n_total 32 --lr 1e-4 --steps 300   # where a bank fails
    python -m benchmarks.bank_drift --encoder scratch --n_total 32 --lr 1e-4 --steps 300 --drift_probe 8   # and moved
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.harness import device, write_result
from benchmarks.quality import MAX_LENGTHS, build_model
from benchmarks.tasks import load_task

AGES = (1, 2, 4, 8, 16)


def drift(history: list, age: int, temperature: float, steps: slice) -> dict:
    """Mean cos, logit error and spread over every pair of probes `age` steps apart, the later one in `steps`."""
    rows = []
    for t in range(len(history))[steps]:
        if t - age < 0:
            continue
        (q_now, p_now), (_, p_then) = history[t], history[t - age]
        shift = q_now @ (p_then - p_now).T / temperature  # signed; its absolute value is the logit error
        error = shift.abs()
        fresh = q_now @ p_now.T / temperature
        off_diagonal = ~torch.eye(len(q_now), dtype=torch.bool)
        rows.append((F.cosine_similarity(p_then, p_now).mean().item(), error[off_diagonal].mean().item(),
                     fresh.masked_select(off_diagonal).view(len(q_now), -1).std(1).mean().item(),
                     shift[off_diagonal].mean().item()))
    if not rows:
        return {}
    cos, error, spread, shift = (statistics.mean(r[i] for r in rows) for i in range(4))
    return {"age": age, "pairs": len(rows), "cos": cos, "logit_error": error, "spread": spread,
            "error_over_spread": error / spread, "shift": shift, "shift_over_spread": shift / spread}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(MAX_LENGTHS), default="wordnet")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--n_total", type=int, default=128)
    parser.add_argument("--probe", type=int, default=256, help="training pairs encoded after every step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encoder", choices=("minilm", "scratch"), default="minilm",
                        help="scratch: the randomly initialised encoder of staleness.py --encoder scratch")
    parser.add_argument("--bank", default="auto", help='memory_bank_size ("auto" = N_total; 0: gradient accumulation)')
    parser.add_argument("--drift_probe", type=int, default=0, help="bank_drift_probe of the training run (0: off)")
    parser.add_argument("--output", default=None, help="default benchmarks/results/staleness/bank_drift_<task>.json")
    args = parser.parse_args()

    from transformers import TrainerCallback

    from hf_contaccum import ContAccumTrainer, ContAccumTrainingArguments

    temperature, max_lengths = 0.05, MAX_LENGTHS[args.task]
    train, *_ = load_task(args.task, 10, 100)
    probe = train.shuffle(seed=1234).select(range(args.probe))
    torch.manual_seed(args.seed)
    model = build_model(args.encoder)
    history = []

    class Probe(TrainerCallback):
        def on_train_begin(self, targs, state, control, model=None, **kwargs):
            self.on_step_end(targs, state, control, model=model)  # the pretrained encoder: age counts from here

        def on_step_end(self, targs, state, control, model=None, **kwargs):
            encode = {"batch_size": 64, "tokenizer": model.tokenizer}
            queries = model.encode_queries(probe["query"], max_length=max_lengths[0], **encode)
            passages = model.encode_passages(probe["positive"], max_length=max_lengths[1], **encode)
            history.append((F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)))

    targs = ContAccumTrainingArguments(
        output_dir="/tmp/bank_drift", per_device_train_batch_size=8, gradient_accumulation_steps=args.n_total // 8,
        max_steps=args.steps, learning_rate=args.lr, warmup_steps=0.1, max_grad_norm=2.0, seed=args.seed,
        data_seed=args.seed, memory_bank_size=args.bank if args.bank == "auto" else int(args.bank),
        similarity="cos", temperature=temperature, bank_drift_probe=args.drift_probe,
        query_max_length=max_lengths[0], passage_max_length=max_lengths[1], logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=device() == "cpu", disable_tqdm=True, collapse_patience=0)  # watch it, whatever
    trainer = ContAccumTrainer(model=model, args=targs, train_dataset=train, processing_class=model.tokenizer,
                               callbacks=[Probe()])
    trainer.train()
    model.train()
    with torch.no_grad():  # two dropout draws of the same passages by the same encoder
        draws = [F.normalize(model(passage_input_ids=batch["input_ids"], passage_attention_mask=batch["attention_mask"])
                             .passage_embeddings, dim=-1) for batch in [model.tokenizer(
                                 list(probe["positive"]), padding=True, truncation=True, max_length=max_lengths[1],
                                 return_tensors="pt").to(model.device)] * 2]
    off_diagonal = ~torch.eye(args.probe, dtype=torch.bool)
    dropout = ((history[-1][0] @ (draws[0] - draws[1]).T).abs() / temperature)[off_diagonal].mean().item()
    half = len(history) // 2
    per_step = [drift(history, 1, temperature, slice(t, t + 1)) for t in range(1, len(history))]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"task": args.task, "steps": args.steps, "lr": args.lr, "n_total": args.n_total, "probe": args.probe,
              "encoder": args.encoder, "bank": args.bank, "drift_probe": args.drift_probe,
              "temperature": temperature, "seed": args.seed, "dropout_logit_error": dropout,
              "dropout_cos": F.cosine_similarity(draws[0], draws[1]).mean().item(),
              "all_steps": [drift(history, a, temperature, slice(None)) for a in AGES],
              "second_half": [drift(history, a, temperature, slice(half, None)) for a in AGES],
              "age_1_by_step": [{"step": t + 1, "loss": loss, **{k: row[k] for k in ("spread", "error_over_spread",
                                                                                    "shift_over_spread")}}
                                for t, (row, loss) in enumerate(zip(per_step, losses))]}
    print(f"{'age (steps)':>12}{'cos':>8}{'logit error':>13}{'spread':>8}{'error/spread':>14}{'shift/spread':>14}"
          "   (all steps; error/spread in the second half)")
    for whole, late in zip(result["all_steps"], result["second_half"]):
        if whole:
            print(f"{whole['age']:>12}{whole['cos']:>8.4f}{whole['logit_error']:>13.3f}{whole['spread']:>8.3f}"
                  f"{whole['error_over_spread']:>14.3f}{whole['shift_over_spread']:>14.3f}   "
                  + (f"{late['error_over_spread']:.3f}" if late else "-"))
    print(f"dropout: two train-mode encodings of the same passages: cos {result['dropout_cos']:.4f}, "
          f"logit error {dropout:.3f}")
    defaults = (args.encoder, args.bank, args.n_total, args.lr) == ("minilm", "auto", 128, 5e-5)
    suffix = "" if defaults else f"_{args.encoder}_n{args.n_total}_lr{args.lr:g}_bank{args.bank}"
    suffix += f"_probe{args.drift_probe}" if args.drift_probe else ""
    write_result(result, args.output, f"staleness/bank_drift_{args.task}{suffix}.json")


if __name__ == "__main__":
    main()
