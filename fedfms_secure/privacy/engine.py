"""Opacus wiring: one front door, :func:`make_private_trainer`, that turns a model, an optimizer
and a dataset into DP-SGD pieces bound to a site's persisted accountant, and undoes it all after.

Opacus' own components are used directly (``GradSampleModule``, ``DPOptimizer``, the Poisson
``UniformWithReplacementSampler`` with its empty-batch collate and ``BatchSplittingSampler``, i.e.
what ``DPDataLoader`` and ``BatchMemoryManager`` assemble) rather than
``PrivacyEngine.make_private``, because the latter derives the sampling rate from the loader
length (``1 / ceil(n / batch)``), which differs from the ``batch / n`` the site's noise was
calibrated for. Here the Poisson sampler, the optimizer's expected batch size and the accountant
all use ``SitePrivacy.sample_rate``, and the sampler is built with its number of steps.

``dataset`` holds the DP records: with the unit "patient" it is a
:class:`~fedfms_secure.privacy.units.PatientDataset` (one random slice of a patient per item), so
everything here (sampling, clipping, noise) works on patients unchanged.

``clipping="ghost"`` swaps in Opacus' fast-gradient-clipping pair
(``GradSampleModuleFastGradientClipping``, ``DPOptimizerFastGradientClipping``): the first backward
computes each record's gradient norm (without materialising per-sample gradients for ``nn.Linear``,
whose inputs must then be 2-D or 3-D; other layers go through per-sample gradients as before), the
second backprops the clipped-weighted per-record losses. The clipped sum, the noise and the
accounting are those of the standard mode; it trades a second backward for memory.

The sampler and the noise draw from generators whose state comes from the OS entropy pool
(:func:`~fedfms_secure.privacy.units.entropy_generator`), never from a configured seed: noise
that a peer could regenerate would give no privacy. The noise is drawn in Opacus' ``secure_mode``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from fedfms_secure.errors import ConfigError, ModelError, PrivacyBudgetExhausted
from fedfms_secure.privacy.site import SitePrivacy
from fedfms_secure.privacy.units import entropy_generator


#: how DP-SGD clips: Opacus' per-sample gradients, or its ghost clipping
CLIPPING_MODES = ("standard", "ghost")


def check_trainable(model: nn.Module, dataset: Dataset) -> list[nn.Parameter]:
    """The trainable parameters of ``model``; :class:`ModelError` if there is nothing to train
    (an empty ``dataset`` or no parameter with ``requires_grad``). Shared by plain and DP training.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ModelError("the site dataset is empty; check its imagesTr/labelsTr folders")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("no parameter requires grad; call apply_mode(model, mode) first")
    return params


def check_budget(privacy: SitePrivacy, steps: int) -> None:
    """:class:`PrivacyBudgetExhausted` if ``steps`` more DP steps would pass the target epsilon."""
    if privacy.would_exceed(steps):
        raise PrivacyBudgetExhausted(
            f"{steps} more DP steps would take epsilon from {privacy.epsilon():.3f} to "
            f"{privacy.epsilon_after(steps):.3f}, past the target "
            f"{privacy.config.target_epsilon} (state in {privacy.state_dir}); this site's budget "
            "for its data is spent: leave it out of further rounds"
        )


class SingleUseBatches:
    """The physical batches of exactly ``steps`` logical steps; iterable once only.

    A second pass would take ``steps`` more accounted steps that no budget check allowed.
    """

    def __init__(self, loader: DataLoader, steps: int) -> None:
        self._loader = loader
        self._used = False
        self.steps = steps

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Any]:
        if self._used:
            raise RuntimeError(
                f"PrivateTrainer.batches was already iterated: its {self.steps} DP steps were "
                "budget-checked once; open a new make_private_trainer(...) for more steps"
            )
        self._used = True
        return iter(self._loader)


@dataclass
class PrivateTrainer:
    """The DP-SGD pieces for one local training; valid only inside :func:`make_private_trainer`.

    Iterate ``batches`` once (physical batches of at most ``max_physical_batch`` images), run
    ``module`` on each, call :meth:`backward` with the independent per-image loss terms, then call
    ``optimizer.step()`` and ``optimizer.zero_grad()``. For an empty batch call
    :meth:`empty_step` instead: Poisson sampling can draw none, and that step must still add noise
    and be accounted.
    """

    module: GradSampleModule
    optimizer: DPOptimizer
    batches: SingleUseBatches
    clipping: str = "standard"

    def backward(self, per_image_losses: Tensor, images_per_record: int = 1) -> None:
        """Backpropagates the mean of ``per_image_losses`` (one term per image of the physical
        batch) as the clipping mode needs: once (standard), or twice with the records' clipping
        weights in between (ghost).

        ``images_per_record`` m > 1 (standard clipping only): the batch holds m consecutive images
        of each record (a patient's slices); their per-image gradients are averaged into the
        record's one gradient here, before the optimizer clips it, so each record still gives one
        clipped gradient of norm at most C."""
        if self.clipping == "ghost":
            if images_per_record != 1:
                raise ConfigError("several images per record need standard clipping, not ghost clipping")
            DPTensorFastGradientClipping(self.module, self.optimizer, per_image_losses, "mean").backward()
            return
        if len(per_image_losses) % images_per_record:
            raise ConfigError(f"{len(per_image_losses)} images do not split into records of {images_per_record}")
        per_image_losses.mean().backward()
        if images_per_record > 1:
            for p in self.optimizer.params:
                sample = getattr(p, "grad_sample", None)
                if sample is None:
                    continue
                if not isinstance(sample, Tensor):  # one per forward pass: this trainer makes one
                    raise ConfigError("several forward passes per step are not supported with images_per_record")
                p.grad_sample = sample.reshape(-1, images_per_record, *sample.shape[1:]).mean(dim=1)

    def empty_step(self) -> None:
        """A noise-only step for an empty Poisson batch."""
        for p in self.optimizer.params:
            if self.clipping == "ghost":  # the clipped sum is read from p.grad
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()
        self.optimizer.zero_grad()

    @property
    def logical_step_done(self) -> bool:
        """True if the last ``optimizer.step()`` finished a logical (noised, accounted) step."""
        return not self.optimizer._is_last_step_skipped


def _poisson_loader(
    dataset: Dataset, sample_rate: float, steps: int, optimizer: DPOptimizer, max_physical: int
) -> DataLoader:
    """Opacus' ``DPDataLoader`` + ``BatchMemoryManager`` pipeline, built with ``steps`` up front.

    ``steps`` Poisson batches at ``sample_rate``, each split into physical batches of at most
    ``max_physical`` items (the splitter tells ``optimizer`` which one ends a logical step);
    empty batches collate to zero-length tensors shaped like the dataset's items.
    """
    sampler = UniformWithReplacementSampler(
        num_samples=len(dataset),  # type: ignore[arg-type]
        sample_rate=sample_rate,
        generator=entropy_generator(),
        steps=steps,
    )
    first = dataset[0]
    collate = wrap_collate_with_empty(
        collate_fn=default_collate,
        sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
        dtypes=[dtype_safe(x) for x in first],
    )
    splitter = BatchSplittingSampler(
        sampler=sampler, max_batch_size=max_physical, optimizer=optimizer
    )
    return DataLoader(dataset, batch_sampler=splitter, collate_fn=collate)


@contextmanager
def make_private_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    privacy: SitePrivacy,
    *,
    steps: int,
    max_physical_batch: int = 16,
    secure_mode: bool = True,
    clipping: str = "standard",
) -> Iterator[PrivateTrainer]:
    """DP-SGD over ``dataset`` (one item per DP record) for ``steps`` logical steps, accounted in
    ``privacy``. ``secure_mode`` draws each noise value as Opacus' sum of four Gaussians.
    ``clipping`` is ``"standard"`` (per-sample gradients) or ``"ghost"`` (see the module docstring).

    Raises :class:`PrivacyBudgetExhausted` before touching the model if ``steps`` more steps would
    pass the site's target epsilon, and :class:`ModelError` if there is nothing to train. On exit
    (also on error) the model is left a plain module again (no Opacus hooks or per-sample
    attributes) and the accountant's state is saved to disk.
    """
    if steps < 1:
        raise ConfigError(f"make_private_trainer needs steps >= 1, got {steps}")
    if clipping not in CLIPPING_MODES:
        raise ConfigError(f"clipping {clipping!r} is not one of {', '.join(CLIPPING_MODES)}")
    check_trainable(model, dataset)
    check_budget(privacy, steps)
    num_samples = len(dataset)  # type: ignore[arg-type]
    device = next(p for p in model.parameters() if p.requires_grad).device
    ghost = clipping == "ghost"
    if ghost:
        module: GradSampleModule = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", strict=True,
            max_grad_norm=privacy.config.max_grad_norm, use_ghost_clipping=True,
        )  # fmt: skip
    else:
        module = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        module.forbid_grad_accumulation()
        dp_optimizer = (DPOptimizerFastGradientClipping if ghost else DPOptimizer)(
            optimizer,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=privacy.config.max_grad_norm,
            expected_batch_size=max(1, round(privacy.sample_rate * num_samples)),
            loss_reduction="mean",
            generator=entropy_generator(device),  # noise is drawn where the parameters live
            secure_mode=secure_mode,
        )
        dp_optimizer.attach_step_hook(
            privacy.accountant.get_optimizer_hook_fn(sample_rate=privacy.sample_rate)
        )
        with warnings.catch_warnings():
            # Frozen layers before the first trainable one give it inputs without grad: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            yield PrivateTrainer(
                module=module,
                optimizer=dp_optimizer,
                clipping=clipping,
                batches=SingleUseBatches(
                    _poisson_loader(dataset, privacy.sample_rate, steps, dp_optimizer,
                                    max_physical_batch),
                    steps,
                ),
            )  # fmt: skip
    finally:
        module.to_standard_module()
        for sub in model.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in sub.__dict__:
                    delattr(sub, attr)
        for p in model.parameters():
            p.grad = None
            for attr in ("summed_grad", "_norm_sample", "_forward_counter", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        privacy.save()


__all__ = ["CLIPPING_MODES", "PrivateTrainer", "SingleUseBatches", "check_budget", "check_trainable",
           "make_private_trainer"]
