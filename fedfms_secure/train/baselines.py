"""The baselines FedFMS compares against, with the federated run's own training code.

* :func:`train_central`: every site's training slices pooled in one place (the upper reference a
  federation tries to reach), evaluated on each site's validation slices, and on a held-out site.
* :func:`run_local_baselines`: each site trains alone on its own slices and is evaluated on its own
  validation slices (what a site gets without federating).

Both use :func:`~fedfms_secure.train.local.train_local` (Adam, Dice + BCE + IoU-head loss, DP-SGD
through Opacus when ``epsilon`` is given), :func:`~fedfms_secure.data.load_site` with the same
split a site draws (same ``seed``), and :mod:`~fedfms_secure.train.metrics` for Dice, IoU and
HD95. With ``holdout`` the named site never trains and is scored on all of its slices at the end
(leave-one-site-out, as in FedFMS).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from torch.utils.data import ConcatDataset

from fedfms_secure.config import FEDERATED_LEARNING_RATE
from fedfms_secure.data.labels import num_classes_of
from fedfms_secure.data.layout import find_sites
from fedfms_secure.data.loader import SiteData, load_site
from fedfms_secure.data.preprocess import CLIP_PERCENTILES, check_percentiles
from fedfms_secure.errors import ConfigError
from fedfms_secure.train.metrics import METRICS, ImageScores, score_model, summarize

log = logging.getLogger("fedfms_secure.train")

Progress = Callable[[str], None]
SITE_FIELDS = tuple(f"{metric}_{stat}" for metric in METRICS for stat in ("mean", "std"))


@dataclass(frozen=True)
class BaselineOptions:
    """How a baseline trains and what data it reads (defaults: those of a federated run)."""

    mode: str = "fedmsa"
    preset: str = "tiny"
    epochs: int = 25
    batch_size: int = 32
    learning_rate: float = FEDERATED_LEARNING_RATE
    epsilon: float | None = None  # None (or inf): no DP
    delta: float | None = None  # None: min(1e-5, 1/(10 n))
    seed: int = 0
    pretrained: bool = True
    holdout: str | None = None
    device: str = "auto"  # where the model trains and is scored: auto, cpu, cuda, cuda:N
    # data, as a site reads it
    image_size: int | None = None  # None: the preset's input size
    axis: int = 2
    keep_empty_every: int = 5
    labels: str | None = None  # label spec (see fedfms_secure.data.labels); None: non-zero is foreground
    clip_percentiles: tuple[float, float] = CLIP_PERCENTILES
    val_fraction: float = 0.25
    skip_bad: bool = False
    cache: Path | None = None  # slice cache folder; None: no cache
    max_grad_norm: float = 1.0
    # what one DP record is: "patient" (default; batch_size is then expected patients per step)
    # or "slice" (the epsilon then does not protect patients)
    privacy_unit: str = "patient"
    slices_per_patient: int = 1  # patient-level DP: slices averaged per sampled patient before clipping
    patient_pattern: str | None = None  # a 2-D file's patient from its name (see fedfms_secure.data.layout)
    out: Path | None = None  # if set: splits, the trained model(s) and the result JSON go here

    def __post_init__(self) -> None:
        if self.mode not in ("fedmsa", "fedsam"):
            raise ConfigError(f"mode must be fedmsa or fedsam, not {self.mode!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"epsilon must be positive (omit it to train without DP), got {self.epsilon}")
        if self.privacy_unit not in ("patient", "slice"):
            raise ConfigError(f"privacy_unit must be patient or slice, not {self.privacy_unit!r}")
        if self.slices_per_patient < 1 or (self.slices_per_patient > 1 and self.privacy_unit != "patient"):
            raise ConfigError(f"slices_per_patient {self.slices_per_patient}: at least 1, and above 1 only with "
                              "privacy_unit patient")
        object.__setattr__(self, "clip_percentiles", check_percentiles(self.clip_percentiles))
        num_classes_of(self.labels)  # a malformed label spec fails here, before any data is read

    @property
    def dp(self) -> bool:
        return self.epsilon is not None and not math.isinf(self.epsilon)


def train_central(data_dir: Path, options: BaselineOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Pooled training over every site's training split (the held-out site excepted)."""
    say = progress or (lambda message: log.info("%s", message))
    start = time.perf_counter()
    train_dirs, holdout_dir = _sites(data_dir, options.holdout)
    model, names = _build(options)
    sites = [_load(d, options, model.preset.img_size) for d in train_dirs]
    pooled = ConcatDataset([s.train for s in sites])
    say(f"central: {len(pooled)} training slices pooled from {len(sites)} site(s)")
    with tempfile.TemporaryDirectory(prefix="fedfms-central-") as tmp:
        epsilon = _train(model, pooled, options, Path(tmp), say, "central")
    site_rows, parts = [], []
    for site in sites:
        scores = score_model(model, site.val)
        parts.append(scores)
        site_rows.append(_site_row(site, scores))
        say(f"central: {site.name} validation Dice {site_rows[-1]['dice_mean']:.4f}")
    holdout = None
    if holdout_dir is not None:
        held = _load(holdout_dir, options, model.preset.img_size, holdout=True)
        holdout = _site_row(held, score_model(model, held.train), train=0, val=len(held.train))
        say(f"central: held-out {held.name} Dice {holdout['dice_mean']:.4f}")
    if options.out is not None:
        _save(model, names, options, sites[0], Path(options.out) / "central_model.pt", "central")
    return _result("central", options, start, site_rows, ImageScores.concat(parts, model.num_classes),
                   sites[0].class_names, holdout, epsilon)


def run_local_baselines(data_dir: Path, options: BaselineOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Each site trains alone and is scored on its own validation split. With ``holdout`` that site
    never trains, and its entry pools the scores of every site's model on all of its slices."""
    say = progress or (lambda message: log.info("%s", message))
    start = time.perf_counter()
    train_dirs, holdout_dir = _sites(data_dir, options.holdout)
    held: SiteData | None = None
    site_rows, parts, held_parts, spent = [], [], [], []
    class_names: list[str] = []
    for site_dir in train_dirs:
        model, names = _build(options)
        site = _load(site_dir, options, model.preset.img_size)
        class_names = class_names or site.class_names
        say(f"local: {site.name} trains on its {len(site.train)} slices")
        with tempfile.TemporaryDirectory(prefix="fedfms-local-") as tmp:
            epsilon = _train(model, site.train, options, Path(tmp), say, f"local {site.name}")
        spent.append(epsilon)
        scores = score_model(model, site.val)
        parts.append(scores)
        row = _site_row(site, scores)
        row["epsilon"] = epsilon
        site_rows.append(row)
        say(f"local: {site.name} validation Dice {row['dice_mean']:.4f}")
        if holdout_dir is not None:
            held = held or _load(holdout_dir, options, model.preset.img_size, holdout=True)
            held_parts.append(score_model(model, held.train))
        if options.out is not None:
            _save(model, names, options, site, Path(options.out) / f"local_{site.name}_model.pt", "local")
    holdout = None
    if held is not None:
        pooled = ImageScores.concat(held_parts, len(class_names))
        holdout = _site_row(held, pooled, train=0, val=len(held.train))
        say(f"local: held-out {held.name} Dice {holdout['dice_mean']:.4f} (mean over the sites' models)")
    eps = [e for e in spent if e is not None]
    return _result("local", options, start, site_rows, ImageScores.concat(parts, len(class_names)), class_names,
                   holdout, max(eps) if eps else None)


# --- helpers ----------------------------------------------------------------------------------
def _sites(data_dir: Path, holdout: str | None) -> tuple[list[Path], Path | None]:
    sites = find_sites(Path(data_dir))
    if holdout is None:
        return sites, None
    by_name = {s.name: s for s in sites}
    if holdout not in by_name:
        raise ConfigError(f"--holdout {holdout!r} is not a site of {data_dir}; its sites are "
                          f"{', '.join(sorted(by_name))}")
    rest = [s for s in sites if s.name != holdout]
    if not rest:
        raise ConfigError(f"{data_dir} holds only {holdout!r}: holding it out leaves no site to train on")
    return rest, by_name[holdout]


def _build(options: BaselineOptions) -> tuple[Any, list[str]]:
    from fedfms_secure.device import resolve_device
    from fedfms_secure.model.modes import apply_mode
    from fedfms_secure.model.registry import build_model

    device = resolve_device(options.device)  # an absent GPU fails before the model is built
    model = build_model(options.preset, seed=options.seed, pretrained=None if options.pretrained else False,
                        num_classes=num_classes_of(options.labels), img_size=options.image_size)
    model.to(device)
    return model, apply_mode(model, options.mode)


def _load(site_dir: Path, options: BaselineOptions, image_size: int, holdout: bool = False) -> SiteData:
    split_file = None
    if options.out is not None and not holdout:
        split_file = Path(options.out) / "splits" / f"{site_dir.name}.json"
    return load_site(site_dir, image_size=image_size, split_file=split_file,
                     val_fraction=0.0 if holdout else options.val_fraction, seed=options.seed, axis=options.axis,
                     keep_empty_every=options.keep_empty_every, skip_bad=options.skip_bad, labels=options.labels,
                     clip_percentiles=options.clip_percentiles, cache_dir=options.cache,
                     patient_pattern=options.patient_pattern)


def _train(model: Any, dataset: Any, options: BaselineOptions, state: Path, say: Progress, what: str) -> float | None:
    """Train ``model`` with the federated run's code; returns the epsilon spent (None without DP)."""
    from fedfms_secure.privacy.planning import open_site_privacy, plan_records
    from fedfms_secure.train.local import TrainConfig
    from fedfms_secure.train.local import train_local as run_training

    plan = plan_records(dataset, unit=options.privacy_unit if options.dp else "slice", batch_size=options.batch_size)
    config = TrainConfig(epochs=options.epochs, batch_size=plan.expected_per_step, lr=options.learning_rate,
                         seed=options.seed, slices_per_patient=options.slices_per_patient)
    privacy = None
    if options.dp:
        assert options.epsilon is not None
        privacy = open_site_privacy(state, plan, epochs=options.epochs, rounds=1, epsilon=options.epsilon,
                                    delta=options.delta, max_grad_norm=options.max_grad_norm)
    result = run_training(model, dataset, config, privacy)
    eps = "no DP" if result.epsilon is None else (
        f"epsilon {result.epsilon:.3f} per {result.unit}"
        + (" (does not protect patients)" if result.unit == "slice" else f", {plan.records} patients"))
    say(f"{what}: {result.steps} steps in {result.seconds:.1f} s, last-epoch loss {result.loss:.4f}, {eps}")
    return result.epsilon


def _site_row(site: SiteData, scores: ImageScores, *, train: int | None = None, val: int | None = None) -> dict[str, Any]:
    summary = summarize(scores, site.class_names)
    row: dict[str, Any] = {
        "name": site.name,
        "train_slices": len(site.train) if train is None else train,
        "train_patients": len(set(site.train.patients)) if train is None else train,
        "val_slices": len(site.val) if val is None else val,
    }
    row.update({key: summary[key] for key in SITE_FIELDS})
    row["per_class"] = summary["per_class"]
    return row


def _save(model: Any, names: list[str], options: BaselineOptions, site: SiteData, path: Path, source: str) -> None:
    from fedfms_secure.train.model_file import save_model_file

    assert site.preprocessing is not None
    save_model_file(path, model, names, mode=options.mode, seed=options.seed, pretrained=options.pretrained,
                    data=site.preprocessing.describe(), label_spec=options.labels, source=source,
                    info={"epochs": options.epochs, "epsilon": options.epsilon})


def _result(kind: str, options: BaselineOptions, start: float, sites: list[dict[str, Any]], pooled: ImageScores,
            class_names: list[str], holdout: dict[str, Any] | None, epsilon: float | None) -> dict[str, Any]:
    summary = summarize(pooled, class_names)
    return {
        "kind": kind,
        "options": {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                    for k, v in asdict(options).items()},
        "seconds": time.perf_counter() - start,
        "sites": sites,
        "mean": {key: summary[key] for key in SITE_FIELDS},
        "holdout": holdout,
        "epsilon": epsilon,
        "unit": options.privacy_unit if options.dp else None,
    }


__all__ = ["BaselineOptions", "METRICS", "run_local_baselines", "train_central"]
