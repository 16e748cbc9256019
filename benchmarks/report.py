"""The results pages of the docs, generated from benchmarks/results/** (no figure is typed by hand).

Each study folder holds its raw results and an about.json: the study's title, the question it answers, and the
provenance of its files (hardware, versions, command) for results written before write_result recorded it. This
script writes docs/results/<study>.md (tables from every JSON file, plots for the method comparisons) and
docs/results/index.md; tests/test_docs.py fails when a committed page differs from what it writes now.

    python -m benchmarks.report            # rewrite the pages
    python -m benchmarks.report --check    # exit 1 when a page is out of date
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(os.path.dirname(HERE), "docs", "results")
SNIPPETS = os.path.join(os.path.dirname(HERE), "docs", "_snippets")
# the decision table of docs/choosing-a-method.md: (label, name in the quality tables, in the speed runs)
DECISION = (("GradAccum", ("gradaccum",), "gradaccum"),
            ("ContAccum (memory_bank_size=\"auto\")", ("contaccum-128",), "contaccum-1024"),
            ("GradCache (gradcache_chunk_size)", ("gradcache",), "gradcache"),
            ("Hybrid: GradCache + bank", (), "hybrid"),
            ("Full batch (no accumulation)", ("full-batch", "full"), "full"),
            ("sentence-transformers' CachedMNRL", (), "st-cmnrl"),
            ("Passage-only bank (pre-batch negatives)", ("prebatch",), None))
QUALITY = (("WordNet", "quality/quality_wordnet.json"), ("Debian", "quality/quality_debian.json"),
           ("code search", "staleness/staleness_code_n128.json"))
TABLE_KEYS = ("table", "summary", "results", "runs")  # the list of rows a result file leads with, in this order
MAX_ROWS = 60


def studies() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*", "about.json"))):
        with open(path) as f:
            found.append((os.path.basename(os.path.dirname(path)), json.load(f)))
    return sorted(found, key=lambda item: (item[1].get("order", 99), item[0]))


def number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|").replace("\n", " ")
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3:
        return f"{value:.3g}"
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:,.{min(digits, 6)}f}"


def scalar(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def table(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [key for key, value in row.items() if scalar(value) and key not in columns]
    if not columns:
        return []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows[:MAX_ROWS]:
        lines.append("| " + " | ".join(number(row.get(c, "")) if row.get(c) is not None else "" for c in columns)
                     + " |")
    if len(rows) > MAX_ROWS:
        lines.append(f"\n({len(rows) - MAX_ROWS} more rows in the raw file)")
    return lines


def flat(settings: dict, prefix: str = "") -> dict:
    """Top-level scalars, and one level of nested scalars as `outer.inner`."""
    out = {}
    for key, value in settings.items():
        if scalar(value):
            out[prefix + key] = value
        elif isinstance(value, dict) and not prefix and key != "provenance":
            out.update(flat({k: v for k, v in value.items() if scalar(v)}, key + "."))
    return out


def rows_of(data) -> tuple[str | None, list[dict] | None]:
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return None, data
    if isinstance(data, dict):
        for key in TABLE_KEYS:
            value = data.get(key)
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                return key, value
            if isinstance(value, dict) and any(isinstance(r, dict) for r in value.values()):
                return key, [{"method": name, **row} for name, row in value.items() if isinstance(row, dict)]
        if data and all(isinstance(v, dict) for v in data.values()):
            return None, [{"": name, **row} for name, row in data.items()]
    return None, None


def plot_kind(rows: list[dict]) -> str | None:
    if all("ndcg@10" in r and "method" in r for r in rows):
        return "quality"
    if all({"method", "n_total", "seconds_per_step"} <= set(r) for r in rows) and any("peak_mb" in r for r in rows):
        return "speed"
    return None


def plot(rows: list[dict], study: str, stem: str, draw: bool, curves=()) -> str | None:
    """A bar chart of nDCG@10 per method (quality-style tables), time and memory against N_total (speed), or
    the per-step series named by the study's about.json "curves", one line per run."""
    kind, name = plot_kind(rows), f"{study}_{stem}.svg"
    curves = [c for c in curves if any(isinstance(r.get(c), list) and r.get(c) for r in rows)]
    kind = kind or ("curves" if curves else None)
    if kind is None or not draw:
        return kind and f"img/{name}"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "contaccum"
    if kind == "quality":
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.2))
        labels = [str(r["method"]) for r in rows]
        ax.barh(labels, [r["ndcg@10"] for r in rows], xerr=[r.get("ndcg@10_sd") or 0 for r in rows], color="#4a78b5")
        ax.invert_yaxis()
        ax.set_xlabel("nDCG@10 (mean ± sd over seeds)")
    elif kind == "curves":
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
        for ax, key in zip(axes[0], curves):
            for r in rows:
                if r.get(key):
                    ax.plot(range(1, len(r[key]) + 1), r[key], label=str(r.get("method", "")))
            ax.set(xlabel="optimizer step", ylabel=key)
        axes[0][-1].legend(fontsize=7)
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["n_total"])
            left.plot([r["n_total"] for r in mine], [r["seconds_per_step"] for r in mine], marker="o", label=method)
            right.plot([r["n_total"] for r in mine], [r.get("peak_mb") for r in mine], marker="o", label=method)
        left.set(xlabel="N_total", ylabel="seconds per optimizer step", xscale="log", yscale="log")
        right.set(xlabel="N_total", ylabel="peak memory (MiB)", xscale="log")
        right.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.join(DOCS, "img"), exist_ok=True)
    fig.savefig(os.path.join(DOCS, "img", name), metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return f"img/{name}"


def provenance(data, about: dict, name: str) -> list[str]:
    recorded = data.get("provenance", {}) if isinstance(data, dict) else {}
    given = {**about.get("provenance", {}), **about.get("files", {}).get(name, {}), **recorded}
    return [f"- **{label}:** {given[key]}" for key, label in
            (("hardware", "Hardware"), ("versions", "Versions"), ("command", "Command"), ("date", "Date"))
            if given.get(key)]


def section(path: str, study: str, about: dict, plots: bool) -> list[str]:
    name = os.path.relpath(path, os.path.join(RESULTS, study))
    with open(path) as f:
        data = json.load(f)
    stem = os.path.splitext(name)[0].replace(os.sep, "_")
    lines = [f"## {stem}", ""]
    note = about.get("files", {}).get(name, {}).get("what")
    if note:
        lines += [note, ""]
    lines += provenance(data, about, name)
    lines += [f"- **Raw file:** `benchmarks/results/{study}/{name}`", ""]
    settings = {k: v for k, v in flat(data).items() if k not in TABLE_KEYS} if isinstance(data, dict) else {}
    if settings:
        lines += table([{"setting": k, "value": v} for k, v in settings.items()]) + [""]
    key, rows = rows_of(data)
    if rows:
        lines += table(rows) + [""]
        image = plot(rows, study, stem, plots, about.get("curves", ())) if key in ("table", "summary", "runs") \
            else None
        if image:
            lines += [f"![{stem}]({image})", ""]
    return lines


def pytest_summary(path: str) -> str:
    with open(path, errors="replace") as f:
        found = [line.strip().strip("=").strip() for line in f if " passed" in line or " failed" in line]
    return found[-1] if found else None


def page(study: str, about: dict, plots: bool) -> str:
    lines = [f"# {about['title']}", "", ("<!-- generated by python -m benchmarks.report from "
             f"benchmarks/results/{study}/: do not edit -->"), "", f"**Question.** {about['question']}", ""]
    if about.get("answer_page"):
        lines += [f"What the library makes of it: [{about['answer_page']}](../{about['answer_page']}).", ""]
    for path in sorted(glob.glob(os.path.join(RESULTS, study, "**", "*.json"), recursive=True)):
        if os.path.basename(path) != "about.json":
            lines += section(path, study, about, plots)
    for path in sorted(glob.glob(os.path.join(RESULTS, study, "**", "*.jsonl"), recursive=True)):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        lines += [f"## {os.path.relpath(path, os.path.join(RESULTS, study))}", ""] + table(rows) + [""]
    logs = [(p, pytest_summary(p)) for p in sorted(glob.glob(os.path.join(RESULTS, study, "**", "*.log"),
                                                            recursive=True))]
    if any(summary for _, summary in logs):
        lines += ["## Test logs", "", "The last summary line pytest printed in each log.", "",
                  "| log | summary |", "|---|---|"]
        lines += [f"| `{os.path.relpath(p, os.path.join(RESULTS, study))}` | {number(summary)} |"
                  for p, summary in logs if summary]
        lines += [""]
    others = sorted(os.path.relpath(p, RESULTS) for p in glob.glob(os.path.join(RESULTS, study, "**", "*"),
                                                                   recursive=True)
                    if os.path.isfile(p) and not p.endswith((".json", ".jsonl", ".png", ".svg"))
                    and not (p.endswith(".log") and pytest_summary(p)))
    if others:
        lines += ["## Other raw files", "", "Logs, console output and the notes written beside the runs:", ""] + [f"- `benchmarks/results/{p}`" for p in others] + [""]
    return "\n".join(lines).rstrip() + "\n"


def pages(plots: bool = True) -> dict[str, str]:
    out = {f"{study.replace('_', '-')}.md": page(study, about, plots) for study, about in studies()}
    index = ["# Results", "", "<!-- generated by python -m benchmarks.report: do not edit -->", "",
             ("Every table on these pages is generated from the raw results in `benchmarks/results/`, one folder "
             "per study; `benchmarks/README.md` lists the script behind each."), "",
             "| study | question |", "|---|---|"]
    for study, about in studies():
        index.append(f"| [{about['title']}]({study.replace('_', '-')}.md) | {about['question']} |")
    out["index.md"] = "\n".join(index) + "\n"
    return out


def load(name: str):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def decision_table() -> str:
    """Quality at N_total 128 on three tasks, CPU and H200 time and memory at N_total 512, per method."""
    quality = [(task, {r["method"]: r for r in load(name)["table"]}) for task, name in QUALITY]
    cpu = {r["method"]: r for r in load("speed_memory/speed_memory_all.json")["summary"] if r["n_total"] == 512}
    gpu = {}
    for name in ("gpu/paper_h200/run1_n512.json", "gpu/paper_h200/run2_n512.json"):  # ratios within one run
        rows = {r["method"]: r for r in load(name)["results"]}
        gpu.update({m: dict(r, ratio=r["seconds_per_step"] / rows["gradaccum"]["seconds_per_step"])
                    for m, r in rows.items()})
    header = ["method"] + [f"nDCG@10 {task}" for task, _ in quality] + [
        "CPU time / GradAccum", "CPU peak MiB", "H200 time / GradAccum", "H200 peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, names, speed in DECISION:
        cells = [label]
        for _, table_ in quality:
            row = next((table_[n] for n in names if n in table_), None)
            cells.append(f"{row['ndcg@10']:.4f} ± {row['ndcg@10_sd']:.4f}" if row else "not measured")
        c, g = cpu.get(speed), gpu.get(speed)
        cells += [f"{c['time_vs_gradaccum']:.2f}" if c else "not measured", f"{c['peak_mb']:,.0f}" if c else "not measured",
                  f"{g['ratio']:.2f}" if g else "not measured",
                  f"{g['max_memory_allocated_mib']:,.0f}" if g else "not measured"]
        lines.append("| " + " | ".join(cells) + " |")
    pretrained = " · ".join(f"{task} {load(name)['pretrained']['ndcg@10']:.4f}" for task, name in QUALITY)
    return "\n".join(lines + ["", f"Pretrained all-MiniLM-L6-v2, before training: {pretrained}.", "",
                              ("Quality: all-MiniLM-L6-v2, N_total 128 = 8 x 16 (ContAccum: N_mem 128), cosine / 0.05, mean ± sd over seeds "
                              "([Retrieval quality](results/quality.md); code search: [Staleness](results/staleness.md)). "
                              "Time and memory: N_total 512 = 8 x 64 ([CPU, 2 cores](results/speed-memory.md); "
                              "[H200, bert-base, bf16](results/gpu.md)), ContAccum with N_mem 1,024 there (the bank's size barely "
                              "moves either); CPU peak is the process's RSS, H200 peak "
                              "the CUDA allocator's.")]) + "\n"


def headline(draw: bool) -> None:
    """docs/results/img/headline.svg: nDCG@10 per method on each task (the decision table's quality columns)."""
    if not draw:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "contaccum"
    rows = [(label, names) for label, names, _ in DECISION if names]
    fig, axes = plt.subplots(1, len(QUALITY), figsize=(5 * len(QUALITY), 3.4))
    for ax, (task, name) in zip(axes, QUALITY):
        data = load(name)
        table_ = {r["method"]: r for r in data["table"]}
        found = [(label.split(" (")[0], next((table_[n] for n in names if n in table_), None)) for label, names in rows]
        found = [(label, r) for label, r in found if r]
        ax.barh([label for label, _ in found], [r["ndcg@10"] for _, r in found],
                xerr=[r["ndcg@10_sd"] for _, r in found], color="#4a78b5")
        ax.axvline(data["pretrained"]["ndcg@10"], color="grey", linestyle="--", label="before training")
        ax.invert_yaxis()
        low = min(min(r["ndcg@10"] for _, r in found), data["pretrained"]["ndcg@10"])
        ax.set_xlim(low - 0.02, max(r["ndcg@10"] for _, r in found) + 0.01)
        ax.set(title=f"{task}, N_total {data['n_total']}", xlabel="nDCG@10")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.join(DOCS, "img"), exist_ok=True)
    fig.savefig(os.path.join(DOCS, "img", "headline.svg"), metadata={"Date": None, "Creator": None})
    plt.close(fig)


def outputs(plots: bool) -> dict[str, str]:
    """Every generated file: {path: text}."""
    out = {os.path.join(DOCS, name): text for name, text in pages(plots).items()}
    out[os.path.join(SNIPPETS, "decision.md")] = decision_table()
    headline(plots)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed page differs")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs(plots=not args.check).items():
        name = os.path.relpath(path, os.path.dirname(DOCS))
        current = None
        if os.path.exists(path):
            with open(path) as f:
                current = f.read()
        if current != text:
            stale.append(name)
            if not args.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    if args.check and stale:
        print("out of date: " + ", ".join(stale) + "; run python -m benchmarks.report", file=sys.stderr)
        return 1
    print(("wrote " if not args.check else "up to date ") + (", ".join(stale) if stale else "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
