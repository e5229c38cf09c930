"""Opacus wiring: one front door, :func:`make_private_trainer`, that turns a model, an optimizer
and a dataset into DP-SGD pieces bound to a site's persisted accountant, and undoes it all after.

Opacus' own components are used directly (``GradSampleModule``, ``DPOptimizer``,
``DPDataLoader``, ``BatchMemoryManager``) rather than ``PrivacyEngine.make_private``, because the
latter derives the sampling rate from the loader length (``1 / ceil(n / batch)``), which differs
from the ``batch / n`` the site's noise was calibrated for. Here the Poisson sampler, the
optimizer's expected batch size and the accountant all use ``SitePrivacy.sample_rate``.

The sampler and the noise draw from generators seeded by the OS entropy pool, never from a
configured seed: noise that a peer could regenerate would give no privacy.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedfms_secure.errors import ModelError
from fedfms_secure.privacy.site import SitePrivacy


@dataclass
class PrivateTrainer:
    """The DP-SGD pieces for one local training; valid only inside :func:`make_private_trainer`.

    Iterate ``batches`` (physical batches of at most ``max_physical_batch`` images), run
    ``module`` on each, ``backward()`` a *mean* loss of independent per-image terms, then call
    ``optimizer.step()`` and ``optimizer.zero_grad()``. For an empty batch call
    :meth:`empty_step` instead: Poisson sampling can draw none, and that step must still add noise
    and be accounted.
    """

    module: GradSampleModule
    optimizer: DPOptimizer
    batches: DataLoader

    def empty_step(self) -> None:
        """A noise-only step for an empty Poisson batch."""
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad()

    @property
    def logical_step_done(self) -> bool:
        """True if the last ``optimizer.step()`` finished a logical (noised, accounted) step."""
        return not self.optimizer._is_last_step_skipped


def _entropy_generator(device: torch.device | None = None) -> torch.Generator:
    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed(secrets.randbits(63))
    return gen


@contextmanager
def make_private_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    privacy: SitePrivacy,
    *,
    steps: int,
    max_physical_batch: int = 16,
) -> Iterator[PrivateTrainer]:
    """DP-SGD over ``dataset`` for ``steps`` logical steps, accounted in ``privacy``.

    On exit (also on error) the model is left a plain module again (no Opacus hooks or per-sample
    attributes) and the accountant's state is saved to disk.
    """
    num_samples = len(dataset)  # type: ignore[arg-type]
    if num_samples == 0:
        raise ModelError("cannot train on an empty dataset")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError("no parameter requires grad; call apply_mode(model, mode) first")
    device = next(p for p in model.parameters() if p.requires_grad).device
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        module.forbid_grad_accumulation()
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.config.max_grad_norm,
            expected_batch_size=max(1, round(privacy.sample_rate * num_samples)),
            loss_reduction="mean",
            generator=_entropy_generator(device),  # noise is drawn where the parameters live
        )
        dp_optimizer.attach_step_hook(
            privacy.accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate)
        )
        loader = DPDataLoader(dataset, sample_rate=privacy.sample_rate,
                              generator=_entropy_generator())  # fmt: skip
        loader.batch_sampler.steps = steps  # type: ignore[union-attr]
        with (
            warnings.catch_warnings(),
            BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=max_physical_batch,
                optimizer=dp_optimizer,
            ) as batches,
        ):  # fmt: skip
            # Frozen layers before the first trainable one give it inputs without grad: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield PrivateTrainer(module=module, optimizer=dp_optimizer, batches=batches)
    finally:
        module.to_standard_module()
        for sub in model.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in sub.__dict__:
                    delattr(sub, attr)
        for p in model.parameters():
            p.grad = None
            if hasattr(p, "summed_grad"):
                delattr(p, "summed_grad")
        privacy.save()


__all__ = ["PrivateTrainer", "make_private_trainer"]
