"""``HeadOnly``: freeze every parameter except those of a few named modules."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class HeadOnlyError(ValueError):
    """A bad ``HeadOnly`` setting. ``detail`` is the message after ``HeadOnly.``."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"HeadOnly.{detail}")


def _matches(name: str, targets: Sequence[str]) -> bool:
    """An exact module name or a dotted suffix, like ``LoRAConfig.modules_to_save``."""
    return any(name == t or name.endswith("." + t) for t in targets)


class HeadOnly(Callback):
    """Train only ``modules`` (e.g. a new classifier head); everything else is frozen.

    The floor of a fine-tuning comparison: what a frozen pretrained encoder gives with
    nothing but the head trained. Freezing happens in ``setup``, before Lightning calls
    ``configure_optimizers``, so an optimizer built from the parameters that require grad
    (as ``ClassifierModule`` does) sees only the head.

    Args:
        modules: module names, each matching a module's exact qualified name or a dotted
            suffix of it (``"classifier"`` matches ``net.classifier``).
    """

    def __init__(self, modules: Sequence[str]) -> None:
        if isinstance(modules, str):
            modules = [modules]
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise HeadOnlyError(
                f"modules: got {modules!r}; expected a non-empty list of module names."
            )
        self.modules = list(modules)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        matched = [
            module for name, module in pl_module.named_modules()
            if name and _matches(name, self.modules)
        ]
        if not matched:
            children = [name for name, _ in pl_module.named_modules() if name.count(".") <= 1]
            raise HeadOnlyError(
                f"modules: got {self.modules!r}, which matches no module of "
                f"{type(pl_module).__name__}; names near the top are {children[:20]}."
            )
        pl_module.requires_grad_(False)
        for module in matched:
            module.requires_grad_(True)
