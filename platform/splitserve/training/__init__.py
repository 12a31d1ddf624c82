"""Training: ``platform teacher`` (uncompressed teacher), ``distill`` (Entropic Student stage 1),
``finetune`` (stage 2 for any task plugin) and ``train`` (Duan & Zhu single stage).

All four (and ``train-image-codec``) are a :class:`splitserve.training.stage.Stage`, the skeleton
written once, around one loop, :class:`splitserve.training.engine.Engine` (torchrun/DDP, AMP,
crash-safe checkpoints with exact resume, JSON-lines/CSV/TensorBoard logs). Submodules import
torch; this package itself does not, so the CLI can declare its options cheaply (:mod:`.options`).
See ``docs/training.md``.
"""
