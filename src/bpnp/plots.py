"""Figures of the experiments (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(path: Path, losses: Sequence[float], title: str, ylabel: str = "loss") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(np.arange(1, len(losses) + 1), np.maximum(np.asarray(losses), 1e-300))
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel + " (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def keypoint_trajectories(path: Path, traj: np.ndarray, target: np.ndarray, title: str) -> Path:
    """``traj (T, n, 2)`` keypoints over iterations, ``target (n, 2)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    for i in range(traj.shape[1]):
        ax.plot(traj[:, i, 0], traj[:, i, 1], "-", lw=1, color=f"C{i % 10}")
        ax.plot(traj[0, i, 0], traj[0, i, 1], "o", ms=4, color=f"C{i % 10}", mfc="none")
    ax.plot(target[:, 0], target[:, 1], "k+", ms=10, label="target")
    ax.plot(traj[-1, :, 0], traj[-1, :, 1], "k.", ms=5, label="final")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.set_xlabel("u (px)")
    ax.set_ylabel("v (px)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parameter_trajectories(
    path: Path, values: np.ndarray, truth: Sequence[float], names: Sequence[str], title: str
) -> Path:
    """``values (T, k)`` parameters over iterations, drawn as relative error to ``truth``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    truth_arr = np.asarray(truth)
    for j, name in enumerate(names):
        axes[0].plot(values[:, j], label=name, color=f"C{j}")
        axes[0].axhline(truth_arr[j], color=f"C{j}", ls=":", lw=1)
        axes[1].semilogy(np.abs(values[:, j] / truth_arr[j] - 1) + 1e-16, label=name, color=f"C{j}")
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("value (dotted: truth)")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("relative error (log)")
    axes[1].axhline(1e-3, color="k", ls="--", lw=0.8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def points_3d(path: Path, clouds: Sequence[np.ndarray], labels: Sequence[str], title: str) -> Path:
    """Side-by-side 3D scatter plots of point clouds ``(n, 3)``."""
    plt = _plt()
    fig = plt.figure(figsize=(4.2 * len(clouds), 4.2))
    for k, (pts, label) in enumerate(zip(clouds, labels)):
        ax = fig.add_subplot(1, len(clouds), k + 1, projection="3d")
        ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], s=2, c=pts[:, 2], cmap="viridis")
        ax.set_title(label, fontsize=9)
        ax.set_box_aspect(np.ptp(pts, axis=0) + 1e-12)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def corners_on_image(path: Path, image: np.ndarray, detected: np.ndarray, reprojected: np.ndarray, title: str) -> Path:
    """A photograph with detected (green circles) and reprojected (red crosses) corners."""
    plt = _plt()
    h, w = image.shape[:2]
    fig, ax = plt.subplots(figsize=(6.4, 6.4 * h / w))
    ax.imshow(image, cmap="gray")
    ax.plot(detected[:, 0], detected[:, 1], "o", mfc="none", mec="lime", ms=6, label="detected")
    ax.plot(reprojected[:, 0], reprojected[:, 1], "+", color="red", ms=7, label="reprojected")
    ax.set_axis_off()
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def signed_error_histograms(path: Path, errors: dict[str, np.ndarray], xlabel: str, title: str) -> Path:
    """One histogram per label of signed errors ``(N,)``, on common bins over the central 98% of
    all values, each with a line at its median: where a bias shows as a shift off zero."""
    plt = _plt()
    finite = {k: np.asarray(v, dtype=np.float64)[np.isfinite(v)] for k, v in errors.items()}
    pooled = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
    lo, hi = np.quantile(pooled, [0.01, 0.99])
    bins = np.linspace(min(lo, 0.0), max(hi, 0.0), 61)
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for i, (label, values) in enumerate(finite.items()):
        colour = f"C{i}"
        ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, histtype="step", lw=1.4, color=colour,
                label=f"{label} (median {np.median(values):+.1f})")  # fmt: skip
        ax.axvline(np.median(values), color=colour, ls="--", lw=1)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
