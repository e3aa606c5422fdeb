"""A compact keypoint heatmap network in plain ``torch.nn``, its soft-argmax and heatmap loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KeypointHeatmapNet",
    "soft_argmax",
    "heatmap_targets",
    "heatmap_loss",
    "heatmap_confidence",
    "learned_weight_factor",
    "split_outputs",
]


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class KeypointHeatmapNet(nn.Module):
    """Encoder-decoder (U-Net-like, four stride-2 stages down to 1/16, back up to 1/4) that
    predicts one heatmap of logits per keypoint at a quarter of the input resolution.

    Args:
        num_keypoints: heatmaps to predict; width: channels at stride 4 (doubling per stage).
        weight_head: also predict a map of PnP-weight logits per keypoint (a 1x1 convolution
            beside the heatmap head, zero at the start: see :func:`learned_weight_factor`).
    Shapes:
        input ``(B, 3, H, W)`` normalised RGB, H and W multiples of 16; output ``(B, k, H/4, W/4)``
        logits (a spatial softmax turns each into a distribution over pixels); with
        ``weight_head`` a pair ``(logits, weight_logits)`` of that shape each.
    """

    stride = 4

    def __init__(self, num_keypoints: int, width: int = 32, weight_head: bool = False) -> None:
        super().__init__()
        w = width
        self.num_keypoints = num_keypoints
        self.stem = nn.Sequential(_block(3, w // 2, 2), _block(w // 2, w // 2))  # 1/2
        self.down4 = nn.Sequential(_block(w // 2, w, 2), _block(w, w))  # 1/4
        self.down8 = nn.Sequential(_block(w, 2 * w, 2), _block(2 * w, 2 * w))  # 1/8
        self.down16 = nn.Sequential(_block(2 * w, 4 * w, 2), _block(4 * w, 4 * w), _block(4 * w, 4 * w))  # 1/16
        self.up8 = _block(6 * w, 2 * w)
        self.up4 = nn.Sequential(_block(3 * w, w), _block(w, w))
        self.head = nn.Conv2d(w, num_keypoints, 1)
        self.weight_head = nn.Conv2d(w, num_keypoints, 1) if weight_head else None
        if self.weight_head is not None:
            # Zero: every factor starts at 1, so a run warm-started from a heatmap-only snapshot
            # begins with the very PnP weights (the confidences) that run used.
            nn.init.zeros_(self.weight_head.weight)
            nn.init.zeros_(self.weight_head.bias)

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        s4 = self.down4(self.stem(image))
        s8 = self.down8(s4)
        s16 = self.down16(s8)
        x = self.up8(torch.cat([F.interpolate(s16, scale_factor=2.0, mode="nearest"), s8], 1))
        x = self.up4(torch.cat([F.interpolate(x, scale_factor=2.0, mode="nearest"), s4], 1))
        if self.weight_head is not None:
            return self.head(x), self.weight_head(x)
        return self.head(x)  # Bxkx(H/4)x(W/4)


def split_outputs(output: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """A :class:`KeypointHeatmapNet` output as ``(logits, weight_logits)``, whether or not the
    network has a weight head (``weight_logits`` is None without one).

    Args:
        output: ``(B, k, h, w)`` logits, or the pair ``(logits, weight_logits)`` of that shape each.
    Returns:
        ``((B, k, h, w), (B, k, h, w) or None)``.
    """
    return output if isinstance(output, tuple) else (output, None)


def _cell_centres(h: int, w: int, stride: int, like: Tensor) -> tuple[Tensor, Tensor]:
    # Heatmap cell j covers input pixels stride*j .. stride*j + stride-1: its centre in OpenCV
    # pixel coordinates (integers at pixel centres) is stride*j + (stride-1)/2.
    xs = torch.arange(w, dtype=like.dtype, device=like.device) * stride + (stride - 1) / 2
    ys = torch.arange(h, dtype=like.dtype, device=like.device) * stride + (stride - 1) / 2
    return xs, ys


def soft_argmax(logits: Tensor, stride: int = 4, window: int | None = None) -> tuple[Tensor, Tensor]:
    """Expected pixel position under each heatmap's spatial softmax (integral regression, DSNT).

    Args:
        logits: ``(B, k, h, w)``; stride: input pixels per heatmap cell.
        window: None: the expectation over the whole map; an integer r: over the
            ``(2r+1) x (2r+1)`` cells around each map's peak (renormalised), which stray mass far
            from the peak (a second mode) cannot pull.
    Returns:
        ``(coords, probs)``: ``(B, k, 2)`` ``(u, v)`` in input pixels (OpenCV convention) and the
        ``(B, k, h, w)`` softmax over the whole map. Differentiable.
    """
    B, k, h, w = logits.shape
    probs = torch.softmax(logits.flatten(2), -1).view(B, k, h, w)
    xs, ys = _cell_centres(h, w, stride, logits)
    weights = probs
    if window is not None:
        peak = probs.flatten(2).argmax(-1)  # Bxk
        py, px = peak // w, peak % w
        cols = torch.arange(w, device=logits.device)
        rows = torch.arange(h, device=logits.device)
        near = ((cols - px[..., None]).abs() <= window)[..., None, :] & ((rows - py[..., None]).abs() <= window)[
            ..., :, None
        ]
        weights = probs * near
        weights = weights / weights.flatten(2).sum(-1).clamp_min(1e-30)[..., None, None]
    u = (weights.sum(2) * xs).sum(-1)  # Bxk
    v = (weights.sum(3) * ys).sum(-1)
    return torch.stack([u, v], -1), probs


def heatmap_targets(coords: Tensor, shape: tuple[int, int], stride: int = 4, sigma: float = 1.0) -> Tensor:
    """Normalised Gaussian targets ``(B, k, h, w)`` centred at ``coords (B, k, 2)`` (input
    pixels), ``sigma`` in heatmap cells; rows sum to 1 (all-zero for a point off the map)."""
    h, w = shape
    xs, ys = _cell_centres(h, w, stride, coords)
    gx = torch.exp(-0.5 * ((xs - coords[..., :1]) / (sigma * stride)) ** 2)  # Bxkxw
    gy = torch.exp(-0.5 * ((ys - coords[..., 1:]) / (sigma * stride)) ** 2)  # Bxkxh
    g = gy[..., :, None] * gx[..., None, :]
    inside = ((coords[..., 0] >= -0.5) & (coords[..., 0] <= w * stride - 0.5) & (coords[..., 1] >= -0.5)) & (
        coords[..., 1] <= h * stride - 0.5
    )
    total = g.flatten(2).sum(-1).clamp_min(1e-12)
    return g / total[..., None, None] * inside[..., None, None]


def heatmap_loss(logits: Tensor, coords: Tensor, stride: int = 4, sigma: float = 1.0) -> Tensor:
    """Mean KL divergence from Gaussian targets at ``coords`` to each heatmap's spatial softmax
    (cross-entropy less the targets' entropy, so 0 at a perfect fit); keypoints outside the
    map do not count. ``logits (B, k, h, w)``, ``coords (B, k, 2)`` -> scalar."""
    target = heatmap_targets(coords, logits.shape[-2:], stride, sigma).flatten(2)
    logp = torch.log_softmax(logits.flatten(2), -1)
    valid = target.sum(-1) > 0
    kl = (target * (torch.log(target.clamp_min(1e-30)) - logp)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp_min(1)


def heatmap_confidence(probs: Tensor, coords: Tensor, stride: int = 4, radius: float = 1.5) -> Tensor:
    """Probability mass within ``radius`` cells of each soft-argmax position: ``(B, k)`` in
    [0, 1], usable as PnP weights (a peaked heatmap is a confident keypoint)."""
    h, w = probs.shape[-2:]
    xs, ys = _cell_centres(h, w, stride, probs)
    dx = (xs - coords[..., :1]) / stride  # Bxkxw
    dy = (ys - coords[..., 1:]) / stride
    near = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) <= radius**2
    return (probs * near).flatten(2).sum(-1)


def learned_weight_factor(weight_logits: Tensor, probs: Tensor) -> Tensor:
    """Each keypoint's PnP-weight factor in (0, 2): ``2 sigmoid(l)``, where ``l`` is the weight
    head's logit map averaged under that keypoint's heatmap distribution. ``probs`` counts as a
    constant, so the loss that trains the factor cannot reshape the heatmaps (that is what made
    weights learned through the heatmaps' confidences blur the keypoints).

    Args:
        weight_logits: ``(B, k, h, w)`` from :class:`KeypointHeatmapNet` with ``weight_head``.
        probs: ``(B, k, h, w)`` spatial softmax (from :func:`soft_argmax`).
    Returns:
        ``(B, k)``; 1 wherever the logits are 0.
    """
    if weight_logits.shape != probs.shape:
        raise ValueError(f"weight_logits {tuple(weight_logits.shape)} and probs {tuple(probs.shape)} differ")
    return 2 * torch.sigmoid((weight_logits * probs.detach()).flatten(2).sum(-1))
