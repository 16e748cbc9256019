"""Model cards for retrievers trained with ContAccumTrainer (written to README.md), and the citations."""
from __future__ import annotations

import statistics

from ..citations import CONTACCUM_BIBTEX, GRADCACHE_BIBTEX
from .hub import model_name_for_card

_SKIP_EVAL = ("runtime", "per_second", "epoch", "steps")
SIMILARITY_WORDS = {"cos": "cosine similarity", "dot": "dot product"}


def _adapter_words(peft_config: dict) -> str:
    targets = peft_config.get("target_modules")
    return (f"{peft_config.get('peft_type', 'PEFT')} r {peft_config.get('r')}, alpha {peft_config.get('lora_alpha')}, "
            f"on {', '.join(targets) if isinstance(targets, list) else targets}")


def _versions():
    import accelerate
    import datasets
    import tokenizers
    import torch
    import transformers

    from ..version import __version__

    return {"hf_contaccum": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "accelerate": accelerate.__version__, "datasets": datasets.__version__,
            "tokenizers": tokenizers.__version__}


def _metric_order(item) -> tuple:
    """eval_ndcg@10 -> ("eval_ndcg", 10): cut-offs in numeric order (@1, @10, @20, @100), other keys after."""
    name, _, cutoff = item[0].partition("@")
    return (name, int(cutoff)) if cutoff.isdigit() else (name, float("inf"))


def _yaml_list(name, values):
    values = [v for v in (values or []) if v]
    return [f"{name}:"] + [f"- {v}" for v in values] if values else []


def build_model_card(trainer, model_name=None, base_model=None, datasets=None, language=None, license=None,
                     tags=None) -> str:
    args, model = trainer.args, trainer.accelerator.unwrap_model(trainer.model)
    history = trainer.state.log_history
    world = args.world_size if args.gather_across_devices else 1
    n_local, k = args.per_device_train_batch_size, args.gradient_accumulation_steps
    n_total = n_local * k * args.world_size
    ratios = [h["grad_norm_ratio"] for h in history if "grad_norm_ratio" in h]
    negatives = [h["negatives_per_query"] for h in history if "negatives_per_query" in h]
    evals = [h for h in history if any(key.startswith("eval_") for key in h)]
    latest_eval = {}
    for h in evals:
        latest_eval.update({key: v for key, v in h.items() if key.startswith("eval_") and not key.endswith(_SKIP_EVAL)})
    base_model = model_name_for_card(base_model or getattr(model.config, "base_model_name", None))
    h = getattr(trainer, "num_hard_negatives", 0) or 0
    h_bank = h if args.bank_hard_negatives else 0
    full_bank_negatives = n_local * world * (1 + h) + args.memory_bank_size * (1 + h_bank) - 1
    name = model_name or trainer.hub_model_id or "contaccum-retriever"
    tags = ["dense-retrieval", "contaccum", "hf_contaccum", "feature-extraction"] + list(tags or [])

    front = ["---", "library_name: hf_contaccum", "pipeline_tag: feature-extraction"]
    front += _yaml_list("tags", tags) + _yaml_list("datasets", datasets) + _yaml_list("language", [language])
    if base_model:
        front.append(f"base_model: {base_model}")
    if license:
        front.append(f"license: {license}")
    front.append("---")

    lines = front + ["", f"# {name}", "",
                     "A dense retriever (dual encoder) trained with Contrastive Accumulation (ContAccum): gradient "
                     "accumulation plus a dual memory bank of past query and passage vectors, with "
                     "[hf_contaccum](https://pypi.org/project/hf_contaccum/)."
                     + (f" Fine-tuned from `{base_model}`." if base_model else ""), ""]
    lines += ["## ContAccum training", "", "| setting | value |", "|---|---|",
              f"| N_local (per-device micro-batch) | {n_local} |",
              f"| K (accumulation steps) | {k} |",
              f"| processes | {args.world_size} |",
              f"| N_total (pairs per optimizer step) | {n_total} |",
              f"| memory_bank_size (query bank / passage bank) | {args.query_bank_size} / {args.memory_bank_size} |",
              f"| negatives per query (mean over logged steps) | {statistics.mean(negatives):.1f} |" if negatives
              else f"| negatives per query (once the bank is full) | {full_bank_negatives} |",
              f"| temperature | {args.temperature_value} |",
              f"| similarity | {args.similarity} |",
              (f"| towers | {'shared' if model.config.shared else 'separate'}, {model.config.pooling} pooling"
               f"{', L2-normalised' if model.config.normalize else ''} |"),
              *[f"| {side} prompt | `{prompt!r}` |" for side, prompt in (model.config.prompts or {}).items()],
              *([f"| adapters | {_adapter_words(model.config.peft_config)} |"] if model.config.peft_config else []),
              f"| GradCache chunk | {args.gradcache_chunk_size or 'off'} |",
              f"| banked hard negatives | {args.bank_hard_negatives} |",
              *([f"| bank refresh (banked pairs encoded again every N steps) | {args.bank_refresh_steps} |"]
                if args.bank_refresh_steps else []),
              *([f"| bank drift probe (pairs whose mean change moves the bank each step) | {args.bank_drift_probe} |"]
                if args.bank_drift_probe else []),
              f"| learning rate / max grad norm | {args.learning_rate} / {args.max_grad_norm} |",
              f"| optimizer steps | {trainer.state.global_step} |", ""]
    if world > 1:
        lines += [f"The bank was one global pool shared by {world} processes.", ""]
    towers = [h["grad_norm_ratio_towers"] for h in history if "grad_norm_ratio_towers" in h]
    if ratios:
        lines += [("GradNormRatio (gradient norm on the current passages over that on the current queries, at the "
                   "vectors the similarity compares, unit vectors for cosine; what it shows: hf_contaccum's "
                   f"docs/reliability.md): mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}, "
                   f"max {max(ratios):.3f}, last {ratios[-1]:.3f} over {len(ratios)} logged steps."), ""]
    if towers:
        lines += [("Tower GradNormRatio (passage tower over query tower parameter-gradient norm, the paper's "
                   f"definition): mean {statistics.mean(towers):.3f}, last {towers[-1]:.3f}."), ""]
    if not ratios and not towers:
        lines += ["GradNormRatio: not measured (no logging step ran; lower logging_steps to record it).", ""]
    if latest_eval:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key[5:]} | {value:.4f} |" for key, value in sorted(latest_eval.items(), key=_metric_order)
                  if isinstance(value, (int, float))]
        lines.append("")
    repo = trainer.hub_model_id or "path/to/this/model"
    lines += ["## Usage", "", "```python", "from hf_contaccum import BiEncoder", "",
              f'model = BiEncoder.from_pretrained("{repo}")',
              'q = model.encode_queries(["what is a dense retriever?"])',
              'p = model.encode_passages(["A dense retriever encodes queries and passages as vectors."])',
              f"scores = model.similarity(q, p)  # {SIMILARITY_WORDS[args.similarity]}, as in training", "```", "",
              *([("The prompts are saved with the model and applied by `encode_queries`/`encode_passages`; in "
                  "sentence-transformers pass `prompt_name=\"query\"` or `\"passage\"` to `encode` (or use "
                  "`encode_query`/`encode_document`).")] if model.config.prompts else []),
              ("Each tower is also an ordinary transformers encoder in `query_encoder/` (and `passage_encoder/` "
               "for separate towers): `AutoModel.from_pretrained(repo, subfolder=\"query_encoder\")`.")]
    if model.config.shared:
        lines += [("With a shared tower the folder is also a sentence-transformers model: "
                   f"`SentenceTransformer(repo)`, whose `similarity` is the same {SIMILARITY_WORDS[args.similarity]}.")]
    if model.config.peft_config:
        lines += [("The towers carry PEFT adapters: `query_encoder/` holds the adapter (load it with "
                   "`PeftModel.from_pretrained(AutoModel.from_pretrained(base), path)`); `model.merge_adapters()` "
                   "before saving gives plain towers.")]
    lines += ["", "## Framework versions", ""]
    lines += [f"- {k}: {v}" for k, v in _versions().items()]
    lines += ["", "## Citation", "", "```bibtex", CONTACCUM_BIBTEX, "", GRADCACHE_BIBTEX, "```", ""]
    return "\n".join(lines)
