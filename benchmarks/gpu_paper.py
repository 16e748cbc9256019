"""The GPU setting of the throughput issue, end to end through `trainer.train()`, one command.

bert-base built from a config (no download; random weights: speed and memory do not depend
on them), bf16 on CUDA, queries <= 32 tokens, passages and hard negatives 256 tokens (real
WordNet text: several definitions joined, so every passage fills its 256 tokens), one hard
negative per query, N_local 8. Each method runs in its own process (its own peak memory)
through the Trainer's own loop, with a callback that times every optimizer step (CUDA
synchronised) and samples GPU utilisation; the first --warmup steps are not timed. Banks are
pre-filled, so every timed step pays for a full bank.

  gradaccum         N_local 8 x K
  contaccum-M       N_local 8 x K, bank of M pairs (M = 1,024, 8,192, 65,536)
  gradcache         one batch of N_total, GradCache chunks of 8 texts per column
  hybrid            GradCache chunks of 8 over N_total and a bank of 8,192
  full              one batch of N_total without GradCache (recorded as out of memory if it is)
  st-cmnrl          sentence-transformers' CachedMultipleNegativesRankingLoss, mini-batch 8,
                    through SentenceTransformerTrainer
  <method>+compile  the same with torch_compile=True and pad_to_multiple_of=32 (fixed shapes: every
                    query 32 tokens, every passage 256), e.g. contaccum-8192+compile

Reports s/step, per-pair time, ratios to GradAccum, mean GPU utilisation (torch.cuda.utilization,
needs pynvml; None without it) and torch.cuda.max_memory_allocated, and writes JSON.

    python -m benchmarks.speed_memory --setting gpu-paper          # or: python -m benchmarks.gpu_paper
    python -m benchmarks.gpu_paper --n_total 128 --methods gradaccum,contaccum-8192,full
    python -m benchmarks.gpu_paper --tiny                          # a CPU smoke run (tests use it)
    python -m benchmarks.gpu_paper --report benchmarks/results/gpu/paper_h200   # table + plot of saved runs

Budget: about 8 methods x (start-up + (warmup + steps) x s/step); at N_total 512 with
GradAccum near 3-7 s/step on an H100 that is 5-7 minutes with --steps 3.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time

from transformers import TrainerCallback

from benchmarks.harness import device_name, module_command, module_env

METHODS = ["gradaccum", "contaccum-1024", "contaccum-8192", "contaccum-65536", "gradcache", "hybrid", "full",
           "st-cmnrl"]
N_LOCAL, QUERY_TOKENS, PASSAGE_TOKENS = 8, 32, 256


def layout(method: str, n_total: int):
    """(per-device batch, accumulation steps, bank, GradCache chunk)."""
    method = method.split("+")[0]
    k = n_total // N_LOCAL
    return {"gradaccum": (N_LOCAL, k, 0, None), "gradcache": (n_total, 1, 0, N_LOCAL),
            "hybrid": (n_total, 1, 8192, N_LOCAL), "full": (n_total, 1, 0, None)}.get(
        method, (N_LOCAL, k, int(method.split("-")[1]) if method.startswith("contaccum-") else 0, None))


def make_rows(num_rows: int, passage_tokens: int):
    """(query, positive, negative) rows of real WordNet text; passages long enough to fill passage_tokens."""
    from hf_contaccum.data.sample import load_wordnet_sample

    train, *_ = load_wordnet_sample()
    definitions = [train[i]["query"] for i in range(len(train))]
    per_passage = max(1, passage_tokens // 8)  # WordNet definitions are ~10 tokens
    rows = []
    for i in range(num_rows):
        start = (i * per_passage) % max(1, len(definitions) - 2 * per_passage)
        positive = " ; ".join(definitions[start:start + per_passage])
        negative = " ; ".join(definitions[start + per_passage:start + 2 * per_passage])
        rows.append({"query": definitions[(i * 7919) % len(definitions)], "positive": positive, "negative": negative})
    return rows


class StepTimer(TrainerCallback):
    """A TrainerCallback timing each optimizer step (CUDA synchronised) and sampling GPU utilisation."""

    def __init__(self, warmup: int, profile_to: str | None = None):
        import torch

        self.torch, self.warmup, self.times, self.util = torch, warmup, [], []
        self._start = None
        self._sampling = False
        self.profile_to, self._profiler = profile_to, None

    def _sync(self):
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def _sample(self):
        while self._sampling:
            try:
                self.util.append(self.torch.cuda.utilization())
            except Exception:  # no pynvml / no NVML: utilisation unknown  # noqa: BLE001
                return
            time.sleep(0.05)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            if self.torch.cuda.is_available():
                self.torch.cuda.reset_peak_memory_stats()
                self._sampling = True
                threading.Thread(target=self._sample, daemon=True).start()
        if self.profile_to and state.global_step == self.warmup:  # the first timed step, under torch.profiler
            activities = [self.torch.profiler.ProfilerActivity.CPU] + (
                [self.torch.profiler.ProfilerActivity.CUDA] if self.torch.cuda.is_available() else [])
            self._profiler = self.torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        if state.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            try:
                write_profile(self._profiler, self.times[-1], self.profile_to)
            except Exception as error:  # a profile that cannot be read must not cost the timing  # noqa: BLE001
                with open(self.profile_to, "w") as f:
                    f.write(f"profile failed: {error!r}\n")
            self._profiler = None

    def on_train_end(self, args, state, control, **kwargs):
        self._sampling = False


def write_profile(profiler, wall: float, path: str) -> None:
    """One optimizer step's profile: how busy the GPU was, how many kernels were launched, and the ops
    that took the most host time (where a launch-bound step spends it)."""
    events = profiler.key_averages()
    device_us = sum(e.self_device_time_total for e in events if getattr(e, "device_type", None) is not None
                    and str(e.device_type).endswith("CUDA"))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                         "cuLaunchKernelEx"))
    with open(path, "w") as f:
        f.write(f"step wall {wall:.3f} s; GPU kernel time {device_us / 1e6:.3f} s "
                f"({100 * device_us / 1e6 / wall:.1f} % busy); kernel launches {launches}\n\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n")
        if device_us:
            f.write(events.table(sort_by="self_device_time_total", row_limit=25) + "\n")


def encoder_folder(tiny: bool) -> str:
    """bert-base (or a tiny BERT) from a config with a WordPiece tokenizer trained on WordNet, saved as a folder."""
    import torch
    from tokenizers import (
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from hf_contaccum.data.sample import load_wordnet_sample

    train, *_ = load_wordnet_sample()
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator((train[i]["query"] + " " + train[i]["positive"] for i in range(len(train))),
                                trainers.WordPieceTrainer(vocab_size=30522 if not tiny else 1000,
                                                          special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer)) if not tiny else BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    path = tempfile.mkdtemp(prefix="gpu_paper_bert_")
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prefill_bank(loss, dim: int, device) -> None:
    """A full bank from the first step, so that every timed step pays for all of it: random unit vectors under ids
    no real passage has (banked hard negatives too, where the loss keeps them)."""
    import torch

    size = loss.bank.size
    fill = torch.nn.functional.normalize(torch.randn(size, dim, device=device), dim=-1)
    keys = torch.arange(size, device=device) - 10**12
    hard = (fill[:, None], (keys - size)[:, None]) if loss.bank.keep_hard_negatives else ()
    loss.enqueue(fill, fill, keys, *hard)


def bank_mib(loss) -> float:
    """What the bank holds on the device: its vectors and keys, and the log-sum-exp cache."""
    bank = loss.bank
    tensors = [bank.queries, bank.passages, bank.passage_keys, bank.hard_negatives, bank.hard_negative_keys]
    return (sum(t.numel() * t.element_size() for t in tensors if t is not None) + loss.cache.nbytes()) / 2**20


# which of torch's attention kernels SDPA may pick (on CUDA): the profile of session 16 on an H200 found cuDNN's
# attention taking 0.7-0.8 ms of host time per call, against ~25 us of GPU time, i.e. ~35 ms of a 60 ms micro-step
ATTENTION = {"default": None, "no-cudnn": ("flash", "mem_efficient", "math"), "efficient": ("mem_efficient", "math"),
             "math": ("math",)}


def run_method(method: str, n_total: int, steps: int, warmup: int, tiny: bool, path: str,
               profile_dir: str | None = None, extra_args: dict | None = None, attention: str = "default",
               callbacks: list | None = None) -> dict:
    import torch
    from datasets import Dataset

    if ATTENTION[attention]:
        for kernel in ("flash", "mem_efficient", "cudnn", "math"):
            getattr(torch.backends.cuda, f"enable_{kernel}_sdp")(kernel in ATTENTION[attention])

    cuda = torch.cuda.is_available()
    passage_tokens = 32 if tiny else PASSAGE_TOKENS
    rows = make_rows(n_total * (steps + warmup), passage_tokens)
    timer = StepTimer(warmup, os.path.join(profile_dir, f"profile_{method}.txt") if profile_dir else None)
    callbacks = [timer, *(callbacks or [])]
    compiled = method.endswith("+compile")
    common = {"output_dir": tempfile.mkdtemp(), "max_steps": steps + warmup, "learning_rate": 1e-5,
              "report_to": "none", "save_strategy": "no", "logging_steps": 10**6, "disable_tqdm": True,
              "bf16": cuda, "use_cpu": not cuda, "dataloader_num_workers": 0, "seed": 0,
              "torch_compile": compiled, **(extra_args or {})}
    try:
        if method.split("+")[0] == "st-cmnrl":
            from sentence_transformers import (
                SentenceTransformer,
                SentenceTransformerTrainer,
                SentenceTransformerTrainingArguments,
                losses,
                models,
            )

            transformer = models.Transformer(path, max_seq_length=passage_tokens)
            model = SentenceTransformer(modules=[transformer, models.Pooling(transformer.get_word_embedding_dimension())])
            loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=N_LOCAL)
            args = SentenceTransformerTrainingArguments(per_device_train_batch_size=n_total, **common)
            trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                                 loss=loss, callbacks=callbacks)
        else:
            from hf_contaccum import (
                BiEncoder,
                ContAccumTrainer,
                ContAccumTrainingArguments,
            )

            per_device, k, bank, chunk = layout(method, n_total)
            model = BiEncoder.from_encoder(path, shared=True, pooling="mean", normalize=True)
            args = ContAccumTrainingArguments(
                per_device_train_batch_size=per_device, gradient_accumulation_steps=k, memory_bank_size=bank,
                gradcache_chunk_size=chunk, similarity="dot", temperature=0.05, query_max_length=QUERY_TOKENS,
                passage_max_length=passage_tokens, pad_to_multiple_of=32 if compiled else None, **common)
            trainer = ContAccumTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                       processing_class=model.tokenizer, callbacks=callbacks)
            if bank:
                prefill_bank(trainer.contrastive_loss, model.config.encoder_config["hidden_size"], trainer.args.device)
        trainer.train()
        bank_size = bank_mib(trainer.contrastive_loss) if hasattr(trainer, "contrastive_loss") else 0.0
    except torch.OutOfMemoryError:
        return {"method": method, "n_total": n_total, "out_of_memory": True}
    seconds = statistics.median(timer.times)
    return {"method": method, "n_total": n_total, "seconds_per_step": seconds, "seconds_per_pair": seconds / n_total,
            "step_times": timer.times, "gpu_utilisation": statistics.mean(timer.util) if timer.util else None,
            "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
            "bank_mib": bank_size,
            "device": device_name(), "tiny": tiny, "trainer_args": extra_args or {},
            "attention": attention}


def report(folder: str) -> list[dict]:
    """Every run saved in `folder` (*.json from --out): per method the median s/step, the ratio to the
    GradAccum of the same run, time per pair, and peak memory above GradAccum against the bank's vectors;
    writes folder/summary.png."""
    import glob

    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            # other scripts' JSON in the folder (e.g. cuda_graphs.py's) has no "results": skipped
            runs[os.path.basename(path)] = [r for r in json.load(f).get("results", []) if "seconds_per_step" in r]
    first_gradaccum = {}  # N_total -> GradAccum of the first run that has one (for runs without their own)
    for results in runs.values():
        for r in results:
            if r["method"] == "gradaccum":
                first_gradaccum.setdefault(r["n_total"], r)
    rows = []
    for run, results in runs.items():
        own = {r["n_total"]: r for r in results if r["method"] == "gradaccum"}
        rows += [dict(r, run=run, gradaccum=own.get(r["n_total"], first_gradaccum.get(r["n_total"])))
                 for r in results]
    print(f"{'run':<24}{'method':<24}{'N':>5}{'s/step':>8}{'x GradAccum':>12}{'ms/pair':>9}{'util %':>7}"
          f"{'MiB':>9}{'MiB - GA':>9}{'bank vec':>9}")
    for r in rows:
        base = r["gradaccum"]
        ratio = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}" if base else "-"
        extra = f"{r['max_memory_allocated_mib'] - base['max_memory_allocated_mib']:.0f}" if base else "-"
        size = layout(r["method"], r["n_total"])[2] if not r["method"].startswith("st-") else 0
        vectors = 2 * size * 768 * 4 / 2**20  # bert-base: d 768, fp32 query and passage vectors
        print(f"{r['run']:<24}{r['method']:<24}{r['n_total']:>5}{r['seconds_per_step']:>8.3f}{ratio:>12}"
              f"{1000 * r['seconds_per_pair']:>9.2f}{r['gpu_utilisation'] or 0:>7.0f}"
              f"{r['max_memory_allocated_mib']:>9.0f}{extra:>9}{vectors:>9.0f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['method']} (N {r['n_total']})" for r in rows]
    left.barh(labels, [1000 * r["seconds_per_pair"] for r in rows])
    left.set_xlabel("ms per (query, passage) pair, one optimizer step")
    right.barh(labels, [r["max_memory_allocated_mib"] / 1024 for r in rows])
    right.set_xscale("log")
    right.set_xlabel("torch.cuda.max_memory_allocated (GiB, log)")
    right.set_yticklabels([])
    fig.suptitle(f"gpu_paper on {rows[0]['device']}: bert-base, bf16, 256-token passages" if rows else "")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "summary.png"), dpi=110)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_total", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="a tiny BERT and short texts: a smoke run on a CPU")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "gpu", "gpu_paper.json"))
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile the first timed step of each method into DIR/profile_<method>.txt")
    parser.add_argument("--trainer_args", default="{}", help="JSON of extra training arguments for every method, "
                        "e.g. '{\"accelerator_config\": {\"non_blocking\": true}}' or '{\"dataloader_num_workers\": 4}'")
    parser.add_argument("--method_timeout", type=float, default=None, help="seconds one method may take")
    parser.add_argument("--attention", choices=sorted(ATTENTION), default="default",
                        help="the SDPA kernels allowed on CUDA (default: torch's choice, cuDNN's on an H100/H200)")
    parser.add_argument("--report", default=None, metavar="DIR", help="print and plot the runs saved in DIR")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one method
    parser.add_argument("--encoder", default=None, help=argparse.SUPPRESS)  # child process: the model folder
    args = parser.parse_args(argv)
    if args.report:
        return report(args.report)
    if args.one:
        result = run_method(args.one, args.n_total, args.steps, args.warmup, args.tiny, args.encoder, args.profile,
                            json.loads(args.trainer_args), args.attention)
        print("RESULT " + json.dumps(result))
        return None
    results, start = [], time.time()
    encoder = encoder_folder(args.tiny)  # once: every method trains the same model from the same weights
    for method in args.methods.split(","):
        cmd = [*module_command(__file__), "--one", method, "--n_total", str(args.n_total),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--encoder", encoder] + (
                   ["--tiny"] if args.tiny else []) + (["--profile", args.profile] if args.profile else []) + [
                   "--trainer_args", args.trainer_args, "--attention", args.attention]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.method_timeout,
                                  env=module_env(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"))
            lines = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[-1]) if lines else {"method": method, "failed": proc.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"method": method, "failed": f"timed out after {args.method_timeout} s"}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "step_times"}), flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"n_total": args.n_total, "steps": args.steps, "warmup": args.warmup,
                       "wall_seconds": time.time() - start, "results": results}, f, indent=1)
    base = next((r for r in results if r["method"] == "gradaccum" and "seconds_per_step" in r), None)
    print(f"\n{'method':<24}{'s/step':>9}{'x GradAccum':>13}{'GPU util %':>12}{'max alloc MiB':>15}{'bank MiB':>10}")
    for r in results:
        if "seconds_per_step" not in r:
            print(f"{r['method']:<24}{'out of memory' if r.get('out_of_memory') else 'failed':>9}")
            continue
        ratio = r["seconds_per_step"] / base["seconds_per_step"] if base else float("nan")
        util = f"{r['gpu_utilisation']:.0f}" if r["gpu_utilisation"] is not None else "n/a"
        mem = f"{r['max_memory_allocated_mib']:.0f}" if r["max_memory_allocated_mib"] is not None else "n/a"
        print(f"{r['method']:<24}{r['seconds_per_step']:>9.3f}{ratio:>13.2f}{util:>12}{mem:>15}{r['bank_mib']:>10.0f}")
    print(f"wall time {time.time() - start:.0f} s")
    return results


if __name__ == "__main__":
    main()
