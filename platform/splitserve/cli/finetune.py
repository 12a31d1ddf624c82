"""``platform finetune``: stage 2 — train a task head on a bundle's frozen encoder and prior."""

from __future__ import annotations

from ..training.options import comma_words
from ._training import Path, head_config_option, loss_option, opt, pairs_option, training_command, task_option

OPTIONS, register = training_command(
    "finetune", "Stage 2: fine-tune any task's head on a bundle's frozen encoder.",
    "Fine-tune a task head (any installed plugin) on the features of the real coding path; encoder and prior "
    "stay frozen, so the bundle's fingerprint and every deployed edge device stay valid. On a variable-rate "
    "bundle every batch is coded at a rate drawn per step, so the head serves every rate. --tasks trains "
    "several heads and one shared trunk together.",
    "splitserve.cli.finetune:run",
    [
        task_option(required=False, replaces=("tasks",)),
        opt("--tasks", type=comma_words, default=None, metavar="TASK,TASK,...", replaces=("task",),
            help="fine-tune several tasks at once on ONE shared trunk (layer2..4), trained by every task's loss, each "
                 "task with its own head layers: every step takes a batch of each task's own data and minimises "
                 "sum_t w_t * loss_t; the bundle gets every head on the trunk (the gateway runs it once). Instead of "
                 "--task (on the command line, it takes the place of a recipe's task)"),
        pairs_option("--task-weight", "TASK=W", "with --tasks: the weight w_t of a task's loss (default: 1 each)"),
        pairs_option("--task-data", "TASK=DIR", "with --tasks: a task's own dataset root (default: --data, e.g. an "
                                                "fmnist-scenes tree, which holds every task's data)"),
        opt("--bundle", type=Path, metavar="DIR",
            help="bundle to add/replace the task's head in (default: $SPLITSERVE_BUNDLE or the embedded default)"),
        opt("--data", "--coco", dest="data", type=Path, required=True, metavar="DIR",
            help="dataset root (--coco is an alias: a COCO 2017 tree with annotations/instances_{train,val}2017.json)"),
        opt("--teacher", action="extend", nargs="+", default=None, metavar="DIR",
            help="teacher directory: same task → head init + knowledge distillation; other task → layer2..4 init "
                 "(with --tasks: TASK=DIR, one per task)"),
        opt("--freeze-decoder", action="store_true",
            help="keep the decoder frozen (deviation from the papers, whose stage 2 trains decoder + head; use it when "
                 "other heads must keep seeing the same features)"),
        opt("--shared-trunk", action="store_true",
            help="train only the task's own layers (fc; FPN + RetinaNet head; ASPP + DeepLabv3 head) on the bundle's "
                 "shared, frozen layer2..4, which the gateway then runs once per batch for every head on it; the first "
                 "shared head's layer2..4 become the trunk; implies --freeze-decoder"),
        head_config_option("the source head's; weights whose shape changes are re-initialised; with --tasks, "
                           "TASK.KEY=VALUE"),
        opt("--from-scratch", dest="init", action="store_const", const="scratch", group="init",
            help="start from a freshly initialised head (layer2..4 from --teacher if given)"),
        opt("--from-teacher", dest="init", action="store_const", const="teacher", group="init",
            help="start from the same-task --teacher's head even where the bundle already has one"),
        opt("--procedure", default=None, choices=("reference", "direct"),
            help="reference: the task plugin's reference recipe (Entropic Student's detection/segmentation stage 2): "
                 "start from the same-task --teacher's head, distil its layer features toward the teacher's "
                 "(Adam), then train with the task loss at the recipe's optimizer, lr, schedule and epochs (flags you "
                 "give win); the decoder trains only when the bundle has no other head. direct: one task-loss stage "
                 "with the options below. Default: reference where the plugin declares a recipe and a same-task "
                 "--teacher is given without --from-teacher/--from-scratch/--shared-trunk, else direct"),
        opt("--feature-epochs", type=int, default=None, metavar="N",
            help="reference: epochs of the feature-distillation step (default: the recipe's)"),
        opt("--temperature", type=float, default=1.0, help="distillation temperature"),
        opt("--kd-alpha", type=float, default=0.5, help="distillation weight: (1-a)*CE + a*KL"),
        loss_option(),
    ],
    epochs=10, batch_size=128, optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=5e-4, scheduler="step",
    step_size=5, gamma=0.1,
)


def run(cfg) -> int:
    """Route the options to one of the command's three procedures: several heads on one trunk
    (``--tasks``), the task's reference recipe, or the direct stage (``--procedure``'s default is
    settled by :func:`~splitserve.training.reference.settle_procedure`). Imports stay inside, so
    printing help loads no training code."""
    from ..errors import SplitserveError

    if cfg.tasks:
        if cfg.task:
            raise SplitserveError("give --task (one head) or --tasks (several heads on one trunk), not both")
        from ..training.multitask import run_multitask

        return run_multitask(cfg)
    if not cfg.task:
        raise SplitserveError("missing --task (or --tasks for several heads on one shared trunk)")
    for flag in ("task_weight", "task_data"):
        if getattr(cfg, flag, None):
            raise SplitserveError(f"--{flag.replace('_', '-')} goes with --tasks")
    from ..training.reference import run_reference, settle_procedure
    from ..training.teacher import single_teacher

    cfg.teacher = single_teacher(cfg.teacher)
    if settle_procedure(cfg) == "reference":
        return run_reference(cfg)
    from ..training.finetune import FinetuneStage

    return FinetuneStage(cfg).run()
