"""The plots of a run (matplotlib, drawn by the main process only)."""
from __future__ import annotations

from pathlib import Path
from typing import List

def plot_metrics(metrics: dict, path) -> Path:
    """The book's figure: train loss and train accuracy (5 points per epoch) and test accuracy
    (per epoch) against epochs. matplotlib, main process only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = [p for r in metrics["epochs"] for p in r["curve"]]
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot([p[0] for p in curve], [p[1] for p in curve], "-", label="train loss")
    ax.plot([p[0] for p in curve], [p[2] for p in curve], "m--", label="train acc")
    ax.plot([r["epoch"] for r in metrics["epochs"]], [r["test_acc"] for r in metrics["epochs"]],
            "g-.", marker="o", markersize=3, label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(len(metrics["epochs"]), 1))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    d = metrics["dataset"]
    ax.set_title(f"{metrics['preset']} / {metrics['backend']} on {metrics['device']}: "
                 f"{d['name']} {d['size']}x{d['size']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_comparison(runs: List[dict], path) -> Path:
    """Several runs' metrics side by side (one line per run): train loss and test accuracy per
    epoch. For comparing backends trained with the same settings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    for m in runs:
        epochs = [r["epoch"] for r in m["epochs"]]
        label = f"{m['backend']} ({m['device']})"
        left.plot(epochs, [r["loss"] for r in m["epochs"]], marker="o", markersize=3, label=label)
        right.plot(epochs, [r["test_acc"] for r in m["epochs"]], marker="o", markersize=3,
                   label=label)
    left.set_yscale("log")
    for ax, what in ((left, "train loss"), (right, "test acc")):
        ax.set_xlabel("epoch")
        ax.set_title(what, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    d = runs[0]["dataset"]
    fig.suptitle(f"{runs[0]['preset']} on {d['name']} {d['size']}x{d['size']}, same seed",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_house(metrics: dict, path) -> Path:
    """The house-price run's figure: per fold, train (solid) and validation (dashed) log-rmse
    against epochs (log scale, as the book's k_fold plot), and their averages over the folds
    (with the book's measure, in train mode, where it differs: with BatchNorm).
    matplotlib, main process only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, f in enumerate(metrics["folds"]):
        c = colors[i % len(colors)]
        epochs = [r["epoch"] for r in f["epochs"]]
        left.plot(epochs, [r["train_log_rmse"] for r in f["epochs"]], "-", color=c,
                  label=f"fold {f['fold']} train")
        left.plot(epochs, [r["valid_log_rmse"] for r in f["epochs"]], "--", color=c,
                  label=f"fold {f['fold']} valid")
    n = min(len(f["epochs"]) for f in metrics["folds"])
    curves = [("train_log_rmse", "-", "C0", "train, eval mode"),
              ("valid_log_rmse", "--", "C1", "valid, eval mode")]
    if any(f["epochs"][0].get("train_log_rmse_book") != f["epochs"][0]["train_log_rmse"]
           for f in metrics["folds"]):  # differs where there is BatchNorm
        curves += [("train_log_rmse_book", ":", "C2", "train, as the book (train mode)"),
                   ("valid_log_rmse_book", "-.", "C3", "valid, as the book (train mode)")]
    for key, style, color, label in curves:
        mean = [sum(f["epochs"][e][key] for f in metrics["folds"]) / len(metrics["folds"])
                for e in range(n)]
        right.plot(range(1, n + 1), mean, style, color=color,
                   marker="o" if n <= 30 else None, markersize=3, label=label)
    for ax, what in ((left, "log-rmse per fold (eval mode)"),
                     (right, f"average of the {len(metrics['folds'])} folds")):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(what, fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2 if ax is left else 1)
    d = metrics["dataset"]
    network = "linear" if metrics["model"] == "linear" else metrics["preset"]
    fig.suptitle(f"{network} / {metrics['backend']} on {metrics['device']}: {d['name']} "
                 f"({d['train']} houses, {d['features']} features), lr {metrics['config']['lr']}, "
                 f"batch {metrics['config']['batch_size']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
