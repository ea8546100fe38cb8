"""The memory PAC-tuning holds between perturb and restore on MiniLM-L6: the packed mask of the
entries a subtraction would not restore plus their saved originals, at the initial noise and at
fixed stds, against what the official code keeps (the N clamped normals and the N scaled noises
of the step, 8 B/param in fp32, then a deep copy of the latter at the restore: 12 B/param at the
peak).  Writes <out>/pac_memory.md.

    python -m benchmarks.pac_memory [--out benchmarks/results/cpu]"""
import argparse
import math
import os

import torch

OFFICIAL_BYTES = 8.0  # noises + noises_scaled, fp32; the restore's deepcopy adds 4 more at its peak


def main(argv=None):
    from transformers import AutoModelForSequenceClassification

    from fsam_kernels import PACTuning
    from fsam_kernels.optim.pac import KTable

    from .finetune_glue import model_dir
    from .timing import environment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    a = ap.parse_args(argv)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir(a.model_dir), num_labels=2).float()
    opt = PACTuning(model.named_parameters(), torch.optim.AdamW, num_examples=100, stage1_steps=1, lr=1e-5,
                    k_table=KTable([0.01], [0.1]))  # embeddings frozen, as the official code does
    n = sum(p.numel() for p in opt._params)
    start = float(opt.prior_log_stds[0][0].exp())
    rows = []
    for label, std in ((f"initial ({start:.2g})", None), ("1e-3", 1e-3), ("1e-2", 1e-2)):
        if std is not None:
            for s in opt.log_stds:
                s.fill_(math.log(std))
        opt.perturb()
        bits, offsets, saved = opt._perturbed
        held = opt.held_bytes()
        opt.cancel()
        rows.append(f"| {label} | {bits.numel() / n:.3f} | {saved.numel() / n:.3f} | {held / n:.3f} | "
                    f"{OFFICIAL_BYTES:.0f} (12 at the restore) | {OFFICIAL_BYTES * n / held:.0f}x |")
    env = environment("cpu")
    text = ("# PAC-tuning: memory held between perturb and restore, MiniLM-L6\n\n"
            f"{n / 1e6:.1f}M trainable fp32 parameters (embeddings frozen); torch {env['torch']}, commit "
            f"{env['commit']}.  `python -m benchmarks.pac_memory`.\n\n"
            "| noise std | mask B/param | saved originals B/param | held B/param | official B/param | less |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "pac_memory.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
