"""The objective: a module whose ``forward(batch)`` returns its named loss terms.

Each command (teacher, distill, finetune, train) defines one; the engine sums the terms,
back-propagates and steps the optimizers. Frozen submodules stay in eval mode and stay out of
checkpoints (they are rebuilt from the teacher or bundle on resume).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from ..errors import SplitserveError


class TrainingError(SplitserveError):
    """Training cannot go on (non-finite loss, incompatible checkpoint)."""


class Objective(nn.Module):
    """Base class: ``forward(batch) -> (losses, logs)``.

    ``losses`` maps names to scalar tensors that are summed and back-propagated; names in
    ``aux_terms`` (the prior's quantile loss) are optimised too but not counted in the logged
    ``loss``. ``logs`` maps names to scalars that are only logged (e.g. ``bpp``).
    Submodules named in ``frozen`` stay in eval mode and are left out of checkpoints (they are
    rebuilt from the teacher/bundle on resume).
    """

    frozen: tuple[str, ...] = ()
    aux_terms: tuple[str, ...] = ("prior_aux",)
    # parameters that may get no gradient in a step (a variable-rate codec's other rates' gains):
    # DistributedDataParallel must then look for them
    unused_parameters: bool = False

    def begin_step(self, step: int) -> None:
        """Called by the engine before training step ``step`` (the global step, from 0; restored on
        resume), on every process: e.g. to draw the step's rate. Only a function of the step and
        the seed keeps a resumed run exact."""

    def frozen_modules(self) -> list[str]:
        names = []
        for name in self.frozen:
            try:
                if self.get_submodule(name) is not None:
                    names.append(name)
            except AttributeError:
                continue
        return names

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        for name in self.frozen_modules():
            self.get_submodule(name).eval()
        return self

    def checkpoint_state(self) -> dict[str, Tensor]:
        skip = tuple(f"{n}." for n in self.frozen_modules())
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}

    def load_checkpoint_state(self, state: Mapping[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        skip = tuple(f"{n}." for n in self.frozen_modules())
        missing = [k for k in missing if not k.startswith(skip)]
        if missing or unexpected:
            raise TrainingError(
                "the checkpoint does not fit this model (missing "
                f"{', '.join(missing[:3]) or 'nothing'}; unexpected {', '.join(unexpected[:3]) or 'nothing'}); "
                "was it written by a different command or configuration?"
            )

    def export_state(self) -> dict[str, Tensor] | None:
        """What to remember from the best epoch (e.g. the head being fine-tuned); None: nothing."""
        return None


def freeze(module: nn.Module | None) -> nn.Module | None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
    return module
