"""Pretrain the ``tiny`` SAM preset on generic synthetic shapes and textures.

This stands in for SAM's natural-image pretraining, which the tiny preset cannot inherit: the
whole SAM (image encoder, prompt encoder, mask decoder; not the adapters, which stay at their
identity start) trains centrally, without DP, on images of random shapes (ellipses, polygons,
star-shaped blobs, rotated rectangles) with random textures (smooth noise, stripes, checkers,
speckle) on textured backgrounds, under random blur, noise, gamma, bias fields and contrast
inversion. Never the medical generator (``fedfms_secure.data.synth``) or any evaluation data.

Steps alternate between the two ways SAM is used here: prompt-free (the label is every object in
the image, decoder token 0) and box-prompted (the label is the visible part of one object, its
jittered bounding box as prompt). Dice on held-out generic images (another seed) is reported.

    python -m benchmarks.pretrain_tiny                      # writes the shipped weights
    python -m benchmarks.pretrain_tiny --steps 50 --out /tmp/t.pt   # a quick try

Seeded: the same arguments give the same weights on the same machine and torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import _common
from fedfms_secure.model import build_model, save_sam_checkpoint
from fedfms_secure.model.adapters import adapter_parameter_names
from fedfms_secure.model.prompts import boxes_from_labels
from fedfms_secure.model.registry import shipped_weights
from fedfms_secure.train.losses import segmentation_loss
from fedfms_secure.train.metrics import score_masks


# --- generic shapes and textures ----------------------------------------------------------------
def _smooth_noise(n: int, size: int, gen: torch.Generator, scales=(2, 4, 8, 16)) -> torch.Tensor:
    """``[n, S, S]`` smooth random field in about [-1, 1]: upsampled noise at random scales."""
    out = torch.zeros(n, 1, size, size)
    for s in scales:
        weight = torch.rand(n, 1, 1, 1, generator=gen)
        grid = torch.randn(n, 1, s, s, generator=gen)
        out += weight * F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return (out / len(scales) ** 0.5).squeeze(1).clamp(-2, 2) / 2


def _texture(n: int, size: int, gen: torch.Generator, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``[n, S, S]`` textures in about [-1, 1]: smooth noise, stripes, checkers or speckle."""
    kind = torch.randint(0, 4, (n,), generator=gen)
    smooth = _smooth_noise(n, size, gen)
    angle = torch.rand(n, 1, 1, generator=gen) * math.pi
    freq = 0.15 + torch.rand(n, 1, 1, generator=gen) * 0.6
    phase = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
    u = xx * torch.cos(angle) + yy * torch.sin(angle)
    v = -xx * torch.sin(angle) + yy * torch.cos(angle)
    stripes = torch.sin(freq * u + phase)
    checker = torch.sign(torch.sin(freq * u + phase) * torch.sin(freq * v + phase))
    speckle = F.avg_pool2d(torch.randn(n, 1, size, size, generator=gen), 3, 1, 1).squeeze(1) * 2
    tex = torch.stack([smooth, stripes, checker, speckle.clamp(-1, 1)], dim=1)
    return tex[torch.arange(n), kind]


def _shape_masks(n: int, size: int, gen: torch.Generator, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """``[n, S, S]`` boolean masks of one random shape each."""
    cy = (0.15 + 0.7 * torch.rand(n, 1, 1, generator=gen)) * size
    cx = (0.15 + 0.7 * torch.rand(n, 1, 1, generator=gen)) * size
    r0 = (0.08 + 0.22 * torch.rand(n, 1, 1, generator=gen)) * size
    rot = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
    aspect = 0.4 + 0.6 * torch.rand(n, 1, 1, generator=gen)
    dy, dx = yy - cy, xx - cx
    u = (dx * torch.cos(rot) + dy * torch.sin(rot)) / aspect.sqrt()
    v = (-dx * torch.sin(rot) + dy * torch.cos(rot)) * aspect.sqrt()
    radius = torch.sqrt(u**2 + v**2)
    theta = torch.atan2(v, u)
    kind = torch.randint(0, 4, (n,), generator=gen)
    ellipse = radius <= r0
    sides = torch.randint(3, 8, (n, 1, 1), generator=gen).float()
    sector = 2 * math.pi / sides
    polygon = radius * torch.cos(torch.remainder(theta, sector) - sector / 2) <= r0 * torch.cos(sector / 2)
    harmonics = torch.zeros_like(theta)
    for k in range(2, 6):
        amp = 0.25 * torch.rand(n, 1, 1, generator=gen) / k**0.5
        ph = torch.rand(n, 1, 1, generator=gen) * 2 * math.pi
        harmonics = harmonics + amp * torch.cos(k * theta + ph)
    blob = radius <= r0 * (1 + harmonics)
    rect = (u.abs() <= r0) & (v.abs() <= r0 * aspect)
    masks = torch.stack([ellipse, polygon, blob, rect], dim=1)
    return masks[torch.arange(n), kind]


def generic_batch(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``[n, 1, S, S]`` in [0, 1], the union of their objects ``[n, 1, S, S]`` and the
    visible part of one random object per image ``[n, 1, S, S]``."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    base = 0.2 + 0.6 * torch.rand(n, 1, 1, generator=gen)
    tex_amp = 0.25 * torch.rand(n, 1, 1, generator=gen)
    image = base + tex_amp * _texture(n, size, gen, yy, xx)
    ramp = (torch.rand(n, 2, 1, 1, generator=gen) - 0.5) * 0.4 / size
    image = image + ramp[:, 0] * (yy - size / 2) + ramp[:, 1] * (xx - size / 2)
    objects = torch.randint(1, 4, (n,), generator=gen)
    union = torch.zeros(n, size, size, dtype=torch.bool)
    owner = torch.full((n, size, size), -1, dtype=torch.long)
    for j in range(3):
        present = (objects > j).view(n, 1, 1)
        mask = _shape_masks(n, size, gen, yy, xx) & present
        sign = torch.where(torch.rand(n, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
        contrast = sign * (0.08 + 0.4 * torch.rand(n, 1, 1, generator=gen))
        amp = 0.25 * torch.rand(n, 1, 1, generator=gen)
        fill = (base + contrast + amp * _texture(n, size, gen, yy, xx)).clamp(0.02, 0.98)
        image = torch.where(mask, fill, image)
        union |= mask
        owner = torch.where(mask, j, owner)
    # the target of a box prompt: the visible part of one present object (drawn later = on top)
    pick = (torch.rand(n, generator=gen) * objects).long().view(n, 1, 1)
    single = owner == pick
    empty = ~single.flatten(1).any(dim=1)
    single[empty] = union[empty]
    # acquisition: blur, bias field, gamma, noise, sometimes inverted contrast
    image = image.unsqueeze(1)
    sigma = 0.2 + 1.3 * torch.rand(n, generator=gen)
    k = torch.arange(-3, 4, dtype=torch.float32)
    kern = torch.exp(-(k.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kern = kern / kern.sum(dim=1, keepdim=True)
    padded = F.pad(image, (3, 3, 3, 3), mode="replicate")
    rows = F.conv2d(padded.transpose(0, 1), kern.view(n, 1, 1, 7), groups=n)
    image = F.conv2d(rows, kern.view(n, 1, 7, 1), groups=n).transpose(0, 1)
    bias = torch.exp(0.3 * torch.rand(n, 1, 1, 1, generator=gen) * _smooth_noise(n, size, gen, (2, 3)).unsqueeze(1))
    image = (image * bias).clamp(0, 1)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 1.2)
    image = image.clamp_min(1e-4) ** gamma
    invert = torch.rand(n, 1, 1, 1, generator=gen) < 0.2
    image = torch.where(invert, 1 - image, image)
    noise = 0.12 * torch.rand(n, 1, 1, 1, generator=gen)
    image = (image + noise * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    return image, union.unsqueeze(1).float(), single.unsqueeze(1).float()


# --- training -----------------------------------------------------------------------------------
@torch.no_grad()
def held_out_dice(model, images: torch.Tensor, union: torch.Tensor, single: torch.Tensor) -> dict[str, float]:
    model.eval()
    free, boxed = [], []
    for i in range(0, len(images), 64):
        x, u, s = images[i : i + 64], union[i : i + 64], single[i : i + 64]
        free.append(score_masks(torch.sigmoid(model(x)) > 0.5, u > 0.5).dice[:, 0])
        boxed.append(score_masks(torch.sigmoid(model(x, boxes_from_labels(s))) > 0.5, s > 0.5).dice[:, 0])
    model.train()
    # images whose label is empty are not scored (NaN), as everywhere else in the project
    return {"prompt_free": float(np.nanmean(np.concatenate(free))), "box": float(np.nanmean(np.concatenate(boxed)))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--held-out", type=int, default=512)
    parser.add_argument("--out", type=Path, default=shipped_weights("tiny"))
    parser.add_argument("--report", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model("tiny", seed=args.seed, pretrained=False)
    size = model.preset.img_size
    adapters = adapter_parameter_names(model)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(name not in adapters)  # the whole SAM; adapters stay the identity
        if p.requires_grad:
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)),
    )
    train_gen = torch.Generator().manual_seed(args.seed)
    held_gen = torch.Generator().manual_seed(10_000 + args.seed)  # never drawn for training
    held = generic_batch(args.held_out, size, held_gen)
    before = held_out_dice(model, *held)
    start = time.perf_counter()
    model.train()
    running = 0.0
    for step in range(args.steps):
        images, union, single = generic_batch(args.batch, size, train_gen)
        if step % 2 == 0:
            logits, iou = model(images, with_iou=True)
            loss = segmentation_loss(logits, iou, union)
        else:
            boxes = boxes_from_labels(single, jitter=0.1, generator=train_gen)
            logits, iou = model(images, boxes, with_iou=True)
            loss = segmentation_loss(logits, iou, single)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        running = 0.98 * running + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} loss {running:.4f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    after = held_out_dice(model, *held)
    for p in model.parameters():
        p.requires_grad_(False)
    save_sam_checkpoint(model, args.out, adapters=False)
    result = {
        **_common.header(seeds=args.seed, argv=_common.script_argv(__file__, argv)),
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "threads": args.threads, "train_seconds": round(seconds, 1),
        "held_out_images": args.held_out,
        "dice_before": before, "dice_after": after,
        "weights": str(args.out), "weights_bytes": args.out.stat().st_size,
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.report:
        args.report.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
