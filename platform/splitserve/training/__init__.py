"""Training: ``platform teacher`` (uncompressed teacher), ``distill`` (Entropic Student stage 1),
``finetune`` (stage 2 for any task plugin) and ``train`` (Duan & Zhu single stage).

All four share one loop, :class:`splitserve.training.engine.Engine` (torchrun/DDP, AMP,
checkpoints with exact resume, JSON-lines/CSV/TensorBoard logs). Submodules import torch; this
package itself does not, so the CLI can declare its options cheaply (:mod:`.options`).
See ``docs/training.md``.
"""
