"""``platform finetune --procedure reference``: stage 2 as the Entropic Student configs train
detection and segmentation.

Start from the same-task teacher's head (its own layer2..4 and task layers); first distil the
head's outputs of the layers the plugin's :class:`~splitserve.plugins.ReferenceRecipe` names toward
the teacher's on the teacher's own stem (Adam), with encoder and prior frozen; then train with the
task loss at the recipe's small learning rate. The decoder trains in both steps only when the
bundle has no other head: one decoder feeds every head. The recipe is the plugin's, so this module
names no task. Each step is a :class:`~splitserve.training.stage.Stage` with its own work dir; the
first step's checkpoint stays until the whole command is done, so a ``--resume`` after it finished
loads it instead of training it again, and the head's provenance times both steps.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import SplitserveError
from ..plugins import ReferenceRecipe, TaskBatch
from . import common
from .distill import squared_error
from .finetune import FinetuneObjective, FinetuneStage
from .sampling import move_to
from .stage import Plan, bundle_workdir
from .teacher import read_teacher_meta


def settle_procedure(cfg: SimpleNamespace) -> str:
    """``--procedure`` as the run follows it: by default reference where the plugin declares a recipe,
    a same-task teacher is given and no head start (``--from-teacher``/``--from-scratch``) or
    ``--shared-trunk`` asks for the direct one; an explicit reference that cannot run is one line."""
    plugins = common.registry()
    plugin = common.training_plugin(plugins, cfg.task, "finetune")
    same_task = bool(cfg.teacher) and plugins.get(read_teacher_meta(Path(cfg.teacher))["task"]).name == plugin.name
    if cfg.procedure is None:
        cfg.procedure = "reference" if plugin.reference_finetune is not None and same_task and not cfg.shared_trunk \
            and cfg.init is None else "direct"
    elif cfg.procedure == "reference":
        if plugin.reference_finetune is None:
            raise SplitserveError(f"--procedure reference: the {plugin.name} plugin declares no reference recipe")
        if not same_task:
            raise SplitserveError(f"--procedure reference needs --teacher DIR of a {plugin.name} teacher")
        if cfg.shared_trunk or cfg.init == "scratch":
            raise SplitserveError("--procedure reference trains the head's own layer2..4 from the teacher's; "
                                  "drop --shared-trunk / --from-scratch or use --procedure direct")
    return cfg.procedure


class FeatureObjective(FinetuneObjective):
    """Σ over the recipe's layers of ‖tail(h)_l − teacher_tail(teacher_stem(x))_l‖² (plus ‖h − h_t‖²
    when the decoder trains), summed per image as in stage 1."""

    def __init__(self, plugin, codec, head, teacher, layers: tuple[str, ...], train_decoder: bool, seed: int = 0):
        super().__init__(plugin, codec, head, teacher, {}, train_decoder, seed=seed)
        self.layers = tuple(layers)

    def terms(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        with torch.no_grad():
            h_t = self.teacher_stem(images)
            t_feats = self.teacher_head.tail(h_t)
        s_feats = self.head.tail(h)
        losses = {f"mse_{k}": squared_error(s_feats[k], t_feats[k]) for k in self.layers}
        if self.train_decoder:
            losses["mse_layer1"] = squared_error(h, h_t)
        return losses

    def forward(self, batch: TaskBatch):
        return self.terms(batch.images), {}


class FeatureStage(FinetuneStage):
    """The first step: feature distillation; its objective (head, decoder) stays in memory for the
    second, on every process."""

    def __init__(self, cfg: SimpleNamespace, recipe: ReferenceRecipe):
        super().__init__(cfg)
        self.recipe = recipe
        self.objective: FeatureObjective | None = None

    def default_workdir(self) -> Path:
        return bundle_workdir(self.bundle, f"finetune-{self.plugin.name}-features")

    def plan(self) -> Plan:
        cfg, plugin, info = self.cfg, self.plugin, self.info
        data = common.task_data(plugin, cfg, self.manifest.policy, self.codec)
        torch.manual_seed(cfg.seed)
        head, self.config, _source, _fresh = self._init_head({**data.config, **dict(cfg.head_config or {})})
        objective = self.objective = FeatureObjective(plugin, self.codec, head, self.teacher, self.recipe.layers,
                                                      self.train_decoder, seed=cfg.seed)
        params = [p for p in head.tail.parameters() if p.requires_grad]
        params += list(self.codec.decoder.parameters()) if self.train_decoder else []
        val_loader = common.eval_loader(plugin, data.val_set, cfg)

        @torch.no_grad()
        def validate() -> dict[str, float]:
            objective.eval()
            total, n = 0.0, 0
            try:
                for rate in range(objective.codec.rates):  # a variable-rate codec: the mean over its rates
                    objective.rate = rate
                    for batch in val_loader:
                        images = move_to(batch.images, info.device)
                        total += float(sum(objective.terms(images).values())) * images.shape[0]
                        n += images.shape[0]
            finally:
                objective.train()
            return {"feature_loss": total / max(n, 1)}

        return Plan(f"finetune {plugin.name} features", "finetune (reference step 1: feature distillation)",
                    objective, {"main": params}, data, plugin.collate, validate)

    def write(self, plan, result, metrics, provenance) -> str:
        return (f"{self.plugin.name}: distilled {', '.join(self.recipe.layers)} toward the teacher's "
                f"(feature loss {metrics['feature_loss']:.4f}); now the task loss")


def step_options(cfg: SimpleNamespace, recipe: ReferenceRecipe) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The options of each step: the recipe's optimizer, lr, schedule and epochs, except those the
    user set (``--epochs``, ``--feature-epochs``, …); the first step never stops at ``--max-steps``."""
    workdir = Path(cfg.workdir) if cfg.workdir else None
    first = SimpleNamespace(**{**vars(cfg), "optimizer": "adam", "lr": recipe.feature_lr, "scheduler": "none",
                               "weight_decay": 0.0, "max_steps": None, "init": "teacher",
                               "keep_checkpoint": True,  # until the second step is done: a resume skips it
                               "epochs": recipe.feature_epochs if cfg.feature_epochs is None else cfg.feature_epochs,
                               "workdir": workdir / "features" if workdir else None})
    wanted = {"epochs": recipe.epochs, "optimizer": recipe.optimizer, "lr": recipe.lr, "scheduler": recipe.scheduler}
    given = set(getattr(cfg, "given", ()))
    second = SimpleNamespace(**{**vars(cfg), "init": "teacher",
                                **{k: v for k, v in wanted.items() if k not in given}})
    return first, second


def run_reference(cfg: SimpleNamespace) -> int:
    recipe = common.training_plugin(common.registry(), cfg.task, "finetune").reference_finetune
    first_cfg, second_cfg = step_options(cfg, recipe)
    first = FeatureStage(first_cfg, recipe)
    first.run()  # raises Stopped when interrupted; resumed, it loads its finished checkpoint and returns
    state = {k: v.detach().cpu().clone() for k, v in first.objective.export_state().items()}
    second = FinetuneStage(second_cfg, start=(state, f"then {', '.join(recipe.layers)} distilled toward it"))
    second.earlier_seconds = (first.result.seconds, first.result.val_seconds)
    code = second.run()
    if second.result.status == "done" and first.info.is_main and not cfg.keep_checkpoint:
        first.engine.checkpoints.clear()  # the command is done (not stopped early): the first step's goes too
    return code
