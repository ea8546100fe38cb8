"""PNG plots of a benchmark run: time and GB/s against size per provider, memory per optimizer."""
import os


def plot_all(out, kernel_rows, step_rows, env):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in kernel_rows))
    if families:
        fig, axes = plt.subplots(2, len(families), figsize=(4.5 * len(families), 7), squeeze=False)
        for col, family in enumerate(families):
            rows = [r for r in kernel_rows if r["family"] == family and not r.get("oom")]
            for provider in dict.fromkeys(r["provider"] for r in rows):
                pts = sorted((r["params"], r["median_ms"], r["gbps"]) for r in rows if r["provider"] == provider)
                xs = [p[0] for p in pts]
                axes[0][col].plot(xs, [p[1] for p in pts], marker="o", label=provider)
                axes[1][col].plot(xs, [p[2] for p in pts], marker="o", label=provider)
            axes[1][col].axhline(env["copy_gbps"], color="grey", linestyle="--", label="copy bandwidth")
            axes[0][col].set(title=family, xscale="log", yscale="log", ylabel="ms (median)")
            axes[1][col].set(xscale="log", yscale="log", xlabel="parameters", ylabel="effective GB/s")
            axes[0][col].legend(fontsize=7)
        fig.suptitle(f"fsam_kernels kernels on {env['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "kernels.png"), dpi=110)
        plt.close(fig)
    if step_rows:
        lists = list(dict.fromkeys(r["list"] for r in step_rows))
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        names = list(dict.fromkeys(r["optimizer"] for r in step_rows))
        width = 0.8 / max(len(lists), 1)
        for i, lst in enumerate(lists):
            rows = {r["optimizer"]: r for r in step_rows if r["list"] == lst}
            xs = [j + i * width for j in range(len(names))]
            axes[0].bar(xs, [rows[n]["median_ms"] if n in rows else 0 for n in names], width, label=lst)
            axes[1].bar(xs, [rows[n]["held_bytes_per_param"] if n in rows else 0 for n in names], width, label=lst)
        for ax, label in ((axes[0], "ms per step (median)"), (axes[1], "bytes per parameter held beyond AdamW")):
            ax.set_xticks([j + width * (len(lists) - 1) / 2 for j in range(len(names))])
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        fig.suptitle(f"optimizer step on {env['device']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "step.png"), dpi=110)
        plt.close(fig)
