"""``platform teacher``: train (or load and evaluate) the uncompressed teacher of a task."""

from __future__ import annotations

from ._training import SGD_COSINE, ARCHS, Path, head_config_option, loss_option, opt, training_command, task_option

OPTIONS, register = training_command(
    "teacher", "Train or load the uncompressed teacher of a task (stem + head).",
    "Train the uncompressed teacher of a task (or, with --weights/--checkpoint and --epochs 0, load, evaluate "
    "and save it). Writes DIR/teacher.json + stem.safetensors + head.safetensors.",
    "splitserve.training.teacher:run_teacher",
    [
        task_option(),
        opt("--data", type=Path, required=True, metavar="DIR",
            help="dataset root: ImageFolder (train/, val/), COCO 2017 tree, or an fmnist-scenes directory"),
        opt("--arch", default="resnet50", choices=ARCHS, help="ResNet backbone"),
        opt("--weights", default=None, metavar="NAME",
            help="torchvision weights: DEFAULT or an enum member name (task weights where torchvision has them)"),
        opt("--checkpoint", type=Path, default=None, metavar="FILE",
            help="initialise from a local torchvision checkpoint (.pth read with weights_only=True, or .safetensors), "
                 "or from the ResNet of another task's teacher directory"),
        opt("--out", type=Path, required=True, metavar="DIR", help="teacher directory to write"),
        head_config_option("the dataset's (its classes)"),
        loss_option(),
    ],
    **SGD_COSINE, epochs=10, batch_size=64, min_lr_ratio=0.0,
)
