"""M2KD as an Avalanche plugin: multi-model, multi-level distillation from every
previous snapshot (Zhou et al., BMVC 2020)."""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor, nn

from .._cache import CacheMode, check_cache_mode, decide_cache, end_epoch, start_epoch
from .._experience import check_batch, check_is_criterion, check_model_accepts, check_stream, experience_index
from ..distributed import average_batchnorm_statistics, sync_gradients
from ..losses import (
    cross_entropy_over,
    distill_group_features,
    distill_group_logits,
    group_weights,
    sigmoid_distillation_loss,
)
from ..snapshots import PackNetSnapshotStore, StoreKind, make_snapshot_store
from ..taps import AUX_ATTRIBUTE, AuxiliaryHeads, FeatureTaps, feature_channels, resolve_modules
from ..teachers import GroupTeacher, TeacherOutput, TeacherSet

TeacherMode = Literal["all", "last"]
AuxMode = Literal["logits", "features"]
LossForm = Literal["kl", "bce"]


class M2KDPlugin(SupervisedPlugin, supports_distributed=True):
    """Multi-model and multi-level knowledge distillation (M2KD).

    At experience ``t`` the model ``f`` is distilled from the snapshots
    ``g_1 .. g_{t-1}`` of itself taken at the end of every earlier experience
    [paper]. Snapshot ``g_k`` teaches only the logits of the classes ``C_k`` it
    introduced [ours]:

    ``L_MM = sum_k w_k T^2 KL(softmax(g_k(x)[C_k]/T) || softmax(f(x)[C_k]/T))``,
    ``w_k = |C_k| / |C_<t|``.

    Multi-level distillation [paper] taps the modules named in ``aux_layers``:
    each gets an auxiliary head (global pooling + growing linear layer over the
    seen classes) trained with cross-entropy and distilled, group by group, from
    the same head of every snapshot [ours]; or, with ``aux="features"``, the
    feature maps are matched directly. Auxiliary heads are registered on the
    model as ``model.m2kd_aux`` (so the optimizer, ``state_dict`` and snapshots
    include them) and are never used at inference.

    Total (``loss="kl"``): ``CE + aux_ce_weight * sum_l CE_l + mm_weight * L_MM
    + aux_weight * L_AUX``, where CE is the strategy's criterion.

    With ``loss="bce"`` (iCaRL's form) the classification loss itself becomes a
    per-class sigmoid cross-entropy over the seen classes whose targets are one-hot
    for the current classes and ``sigmoid(g_k(x)[c])`` for each old class
    ``c`` in ``C_k``. It replaces the cross-entropy, so the plugin must also be
    the strategy's ``criterion`` (the :class:`~avalanche_m2kd.M2KD` strategy
    does this).

    Args:
        temperature: distillation temperature ``T``. Default 2 [ours]: the LwF
            convention.
        mm_weight: weight of ``L_MM``. Default 0.25 [ours]: at ``T = 2`` this
            makes ``teachers="last"`` exactly as strong as Avalanche's LwF at its
            default ``alpha = 1`` (whose KL has no ``T^2``), so comparisons
            start from the same strength; weight 1 over-regularises on
            Split-Digits with exemplars (measured). Unused with ``loss="bce"``
            (distillation is inside the classification loss).
        aux_weight: weight of the auxiliary distillation ``L_AUX`` (summed over
            tapped layers). Default 0.25 [ours], as ``mm_weight``. With
            ``loss="bce"`` it weights each auxiliary head's per-class sigmoid loss.
        aux_ce_weight: weight of the auxiliary heads' cross-entropy (deep
            supervision). Default 1 [ours]. Unused with ``aux="features"`` or
            ``loss="bce"``.
        teachers: ``"all"`` = M2KD (every snapshot teaches its own group);
            ``"last"`` = the single-teacher ablation (the last snapshot teaches
            all old classes, as LwF). Default ``"all"`` [paper].
        aux_layers: dotted module names to tap (e.g. ``("stage1", "stage2")``).
            Empty (default) disables multi-level distillation.
        aux: ``"logits"`` (auxiliary heads, default [ours]) or ``"features"``
            (feature-map matching).
        feature_distance: ``"mse"`` (default [ours]) or ``"attention"``
            (attention transfer); used with ``aux="features"``.
        snapshot_store: ``"full"`` (default [ours]: exact teachers and no
            constraint on training; small models make the memory moot),
            ``"packnet"`` (the paper's mask-based pruning as we read it) or
            ``"sparse"``. See :mod:`avalanche_m2kd.snapshots`.
        prune_ratio: for ``packnet``, the fraction of free weights pruned (left
            free) after each experience; for ``sparse``, the fraction of each
            weight tensor dropped. Default 0.75 [ours] (PackNet's own setting).
        post_prune_epochs: epochs of fine-tuning after ``packnet`` pruning, on
            the experience's data with the same loss, training only the weights
            the new snapshot keeps. Default 2 [ours]: on Split-Digits one epoch
            after pruning 75% left the digits CNN at chance on its own classes,
            two recovered it fully (measured); PackNet uses 10.
        loss: ``"kl"`` (softmax form, default [ours]: composes with any
            criterion and with Avalanche's LwF baseline) or ``"bce"`` (iCaRL's
            per-class sigmoid form, recommended without a large exemplar memory
            because a softmax head lets new classes crowd out old ones).
        head_layers: names of the classifier heads, stored per snapshot rather
            than pruned. Default: every ``IncrementalClassifier``, else the last
            ``nn.Linear``.
        teacher_cache: ``"auto"`` (default) stores every snapshot's outputs per
            training input and reuses them in later epochs when the training
            transform is deterministic (checked by reading samples twice), exact
            by construction; ``"exact"`` insists (random augmentation is an
            error); ``"off"`` never caches. Feature maps (``aux="features"``)
            are not cached.
        batched_teachers: evaluate all snapshots in one ``torch.func.vmap`` pass
            over their stacked weights instead of a Python loop. Same outputs
            (to float rounding). Default False [ours]: on a 2-core CPU it does
            not pay (see the README's speed table).
        teachers_per_batch: if set (``k``), each batch draws ``k`` snapshots with
            replacement, with probability ``w_k``, and weights each drawn one by
            its count over ``k``: the expected loss equals the full multi-model
            loss, at ``k`` teacher forwards per batch. ``loss="kl"`` only.
            Default None (every snapshot, every batch).
    """

    def __init__(
        self,
        temperature: float = 2.0,
        mm_weight: float = 0.25,
        aux_weight: float = 0.25,
        aux_ce_weight: float = 1.0,
        teachers: TeacherMode = "all",
        aux_layers: Sequence[str] = (),
        aux: AuxMode = "logits",
        feature_distance: Literal["mse", "attention"] = "mse",
        snapshot_store: StoreKind = "full",
        prune_ratio: float = 0.75,
        post_prune_epochs: int = 2,
        loss: LossForm = "kl",
        head_layers: Optional[Sequence[str]] = None,
        teacher_cache: CacheMode = "auto",
        batched_teachers: bool = False,
        teachers_per_batch: Optional[int] = None,
    ):
        super().__init__()
        check_cache_mode("M2KDPlugin", teacher_cache)
        if teachers_per_batch is not None:
            if teachers_per_batch < 1:
                raise ValueError(f"M2KDPlugin: teachers_per_batch must be >= 1, got {teachers_per_batch}")
            if loss != "kl":
                raise ValueError("M2KDPlugin: teachers_per_batch needs loss='kl' (with 'bce' teachers supply targets, not terms)")
        if temperature <= 0:
            raise ValueError(f"M2KDPlugin: temperature must be > 0, got {temperature}")
        if teachers not in ("all", "last"):
            raise ValueError(f"M2KDPlugin: teachers must be 'all' or 'last', got {teachers!r}")
        if aux not in ("logits", "features"):
            raise ValueError(f"M2KDPlugin: aux must be 'logits' or 'features', got {aux!r}")
        if feature_distance not in ("mse", "attention"):
            raise ValueError(f"M2KDPlugin: feature_distance must be 'mse' or 'attention', got {feature_distance!r}")
        if loss not in ("kl", "bce"):
            raise ValueError(f"M2KDPlugin: loss must be 'kl' or 'bce', got {loss!r}")
        if isinstance(aux_layers, str):
            aux_layers = (aux_layers,)
        for name, value in (("mm_weight", mm_weight), ("aux_weight", aux_weight), ("aux_ce_weight", aux_ce_weight)):
            if value < 0:
                raise ValueError(f"M2KDPlugin: {name} must be >= 0, got {value}")
        if post_prune_epochs < 0:
            raise ValueError(f"M2KDPlugin: post_prune_epochs must be >= 0, got {post_prune_epochs}")
        self.temperature = float(temperature)
        self.mm_weight = float(mm_weight)
        self.aux_weight = float(aux_weight)
        self.aux_ce_weight = float(aux_ce_weight)
        self.teachers = teachers
        self.aux_layers = list(aux_layers)
        self.aux = aux
        self.feature_distance = feature_distance
        self.loss = loss
        self.post_prune_epochs = int(post_prune_epochs)
        self.teacher_cache = teacher_cache
        self.batched_teachers = bool(batched_teachers)
        self.teachers_per_batch = teachers_per_batch
        self.snapshots = make_snapshot_store(snapshot_store, prune_ratio, head_layers)
        self.groups: List[List[int]] = []
        """Classes introduced by each finished experience (``C_1, C_2, ...``)."""
        self.current_classes: List[int] = []
        self.last_terms: Dict[str, Tensor] = {}
        """Unweighted loss terms of the last training iteration (detached)."""
        self._teacher_set: Optional[TeacherSet] = None
        self._teacher_groups: List[List[int]] = []
        self._taps: Optional[FeatureTaps] = None
        self._taps_model: Optional[nn.Module] = None
        self._features: List[Tensor] = []
        self._outputs: Optional[List[TeacherOutput]] = None
        self._batch_groups: List[List[int]] = []
        self._batch_weights: List[float] = []
        self._width_checked = False

    # -- configuration helpers -----------------------------------------------------
    @property
    def teacher_set(self) -> Optional[TeacherSet]:
        """The frozen teachers rebuilt for the experience being trained (None
        outside training or before the second experience)."""
        return self._teacher_set

    @property
    def uses_aux_heads(self) -> bool:
        return bool(self.aux_layers) and self.aux == "logits"

    def seen_classes(self, extra: Sequence[int] = ()) -> List[int]:
        """Classes of finished experiences, the current one and ``extra``."""
        seen = {c for g in self.groups for c in g}
        seen.update(self.current_classes)
        seen.update(int(c) for c in extra)
        return sorted(seen)

    def _seen_before(self) -> List[int]:
        return sorted({c for g in self.groups for c in g})

    def config(self) -> dict:
        """The constructor arguments (for result files and checkpoints)."""
        return {
            "temperature": self.temperature,
            "mm_weight": self.mm_weight,
            "aux_weight": self.aux_weight,
            "aux_ce_weight": self.aux_ce_weight,
            "teachers": self.teachers,
            "aux_layers": list(self.aux_layers),
            "aux": self.aux,
            "feature_distance": self.feature_distance,
            "snapshot_store": self.snapshots.kind,
            "prune_ratio": getattr(self.snapshots, "prune_ratio", None),
            "post_prune_epochs": self.post_prune_epochs,
            "loss": self.loss,
            "head_layers": self.snapshots.head_layers,
        }

    # -- model preparation ---------------------------------------------------------
    def prepare_model(self, model: nn.Module, example: Tensor) -> None:
        """Check ``aux_layers`` and attach the auxiliary heads (once).

        ``example`` is one input (with or without batch dimension) used to read
        the tapped layers' channel counts. Called by the plugin before the first
        training experience; call it yourself to use :meth:`compute_losses`
        outside a strategy.
        """
        resolve_modules(model, self.aux_layers)
        if self.uses_aux_heads and not hasattr(model, AUX_ATTRIBUTE):
            device = next(model.parameters()).device
            if example.dim() in (1, 3):
                example = example.unsqueeze(0)
            channels = feature_channels(model, self.aux_layers, example[:1].to(device))
            model.add_module(AUX_ATTRIBUTE, AuxiliaryHeads(self.aux_layers, channels).to(device))
        self.snapshots.bind(model)

    def _student_taps(self, model: nn.Module) -> Optional[FeatureTaps]:
        if not self.aux_layers:
            return None
        if self._taps is None or self._taps_model is not model:
            self._taps = FeatureTaps(model, self.aux_layers)
            self._taps_model = model
        return self._taps

    def _student_forward(self, model: nn.Module, x: Tensor) -> tuple[Tensor, List[Tensor]]:
        """The model's logits and its tapped features (outside the strategy's forward)."""
        taps = self._student_taps(model)
        if taps is None:
            return model(x), []
        with taps:
            logits = model(x)
            return logits, taps.features()

    def _build_teachers(self, device: torch.device | str, cache: bool = False) -> Optional[TeacherSet]:
        n = len(self.snapshots)
        if n == 0:
            self._teacher_groups = []
            return None
        if self.teachers == "all":
            indices, groups = list(range(n)), [list(g) for g in self.groups]
        else:
            indices, groups = [n - 1], [self._seen_before()]
        self._teacher_groups = groups
        modules = [self.snapshots.teacher(k, device) for k in indices]
        return TeacherSet(
            [GroupTeacher(m, g) for m, g in zip(modules, groups)],
            feature_layers=self.aux_layers,
            aux_logits=self.uses_aux_heads,
            batched=self.batched_teachers,
            cache=cache,
        ).to(device)

    def _run_teachers(self, x: Tensor) -> List[TeacherOutput]:
        """All teachers, or a weighted sample of them (``teachers_per_batch``);
        sets the groups and weights the loss uses for this batch."""
        teacher_set = self._teacher_set
        if teacher_set is None:
            self._batch_groups, self._batch_weights = [], []
            return []
        groups = self._teacher_groups
        weights = group_weights(groups)
        k = self.teachers_per_batch
        if k is None or len(groups) <= 1:
            self._batch_groups, self._batch_weights = groups, weights
            return teacher_set.run_all(x)
        draws = torch.multinomial(torch.tensor(weights), k, replacement=True)
        counts = torch.bincount(draws, minlength=len(groups))
        chosen = [j for j in range(len(groups)) if counts[j] > 0]
        # E[count_j / k] = w_j: the weighted sum of the chosen terms is unbiased
        self._batch_groups = [groups[j] for j in chosen]
        self._batch_weights = [float(counts[j]) / k for j in chosen]
        return teacher_set.run_all(x, chosen)

    # -- the loss --------------------------------------------------------------------
    def loss_terms(
        self,
        model: nn.Module,
        logits: Tensor,
        targets: Tensor,
        features: Sequence[Tensor],
        teacher_outputs: Sequence[TeacherOutput],
    ) -> Dict[str, Tensor]:
        """The unweighted terms added to the strategy's loss.

        ``aux_ce`` (auxiliary heads' cross-entropy over the seen classes),
        ``mm`` (multi-model distillation) and ``aux_kd`` (auxiliary
        distillation), each present only when it applies. With ``loss="bce"``
        the auxiliary term is ``aux_bce`` (the classification loss itself comes
        from :meth:`__call__`).
        """
        terms: Dict[str, Tensor] = {}
        seen = self.seen_classes(torch.unique(targets).tolist())
        groups = self._batch_groups if teacher_outputs else []
        weights = self._batch_weights if teacher_outputs else []
        aux_logits = getattr(model, AUX_ATTRIBUTE)(features) if self.uses_aux_heads else []
        if self.loss == "bce":
            if aux_logits:
                terms["aux_bce"] = sum(
                    sigmoid_distillation_loss(a, targets, seen, [o.aux_logits[i] for o in teacher_outputs], groups)
                    for i, a in enumerate(aux_logits)
                )
            return terms
        if aux_logits:
            terms["aux_ce"] = sum(cross_entropy_over(a, targets, seen) for a in aux_logits)
        if not teacher_outputs:
            return terms
        terms["mm"] = distill_group_logits(logits, [o.logits for o in teacher_outputs], groups, self.temperature, weights)
        if self.aux_layers and self.aux == "logits":
            terms["aux_kd"] = sum(
                distill_group_logits(a, [o.aux_logits[i] for o in teacher_outputs], groups, self.temperature, weights)
                for i, a in enumerate(aux_logits)
            )
        elif self.aux_layers:
            terms["aux_kd"] = sum(
                distill_group_features(f, [o.features[i] for o in teacher_outputs], weights, self.feature_distance)
                for i, f in enumerate(features)
            )
        return terms

    def weighted_sum(self, terms: Dict[str, Tensor]) -> Tensor | float:
        """``aux_ce_weight * aux_ce + mm_weight * mm + aux_weight * (aux_kd | aux_bce)``."""
        weights = {"aux_ce": self.aux_ce_weight, "mm": self.mm_weight, "aux_kd": self.aux_weight, "aux_bce": self.aux_weight}
        return sum((weights[k] * v for k, v in terms.items()), 0.0)

    def classification_loss(self, logits: Tensor, targets: Tensor, teacher_outputs: Sequence[TeacherOutput]) -> Tensor:
        """``loss="bce"``: iCaRL's per-class sigmoid loss over the seen classes,
        old-class targets from the snapshot that learned each class."""
        seen = self.seen_classes(torch.unique(targets).tolist())
        groups = self._batch_groups if teacher_outputs else []
        return sigmoid_distillation_loss(logits, targets, seen, [o.logits for o in teacher_outputs], groups)

    def compute_losses(
        self, model: nn.Module, x: Tensor, y: Tensor, current_classes: Optional[Sequence[int]] = None
    ) -> Dict[str, Tensor]:
        """Forward ``model`` on ``(x, y)`` and return the plugin's loss terms
        (see :meth:`loss_terms`), plus ``"classification"`` for ``loss="bce"``
        and ``"total"`` (their weighted sum, without the strategy's CE).

        ``current_classes``: the classes of the experience the batch comes from
        (outside training the plugin otherwise knows only the batch's labels).
        Teachers are rebuilt from the snapshot store unless an experience is
        being trained. For tests, notebooks and custom training loops.
        """
        if current_classes is not None:
            self.current_classes = sorted(int(c) for c in current_classes)
        self.prepare_model(model, x[:1])
        training = self._teacher_set is not None
        if not training:
            self._teacher_set = self._build_teachers(x.device)
        try:
            logits, features = self._student_forward(model, x)
            outputs = self._run_teachers(x)
        finally:
            if not training:
                self._teacher_set = None
        terms = self.loss_terms(model, logits, y, features, outputs)
        total = self.weighted_sum(terms)
        if self.loss == "bce":
            terms["classification"] = self.classification_loss(logits, y, outputs)
            total = total + terms["classification"]
        terms["total"] = total if isinstance(total, Tensor) else logits.new_tensor(total)
        return terms

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The criterion for ``loss="bce"`` (pass the plugin as ``criterion``).

        During training it uses the teacher outputs of the current batch; in
        evaluation it is the plain one-hot sigmoid loss over all outputs.
        """
        if self._outputs is None:
            one_hot = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
            return F.binary_cross_entropy_with_logits(logits, one_hot)
        return self.classification_loss(logits, targets, self._outputs)

    # -- Avalanche hooks ---------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        if self.loss == "bce":
            check_is_criterion("M2KDPlugin(loss='bce')", self, strategy, "the M2KD strategy")

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        experience = strategy.experience
        self.current_classes = check_stream("M2KDPlugin", strategy, self._seen_before())
        example = torch.as_tensor(experience.dataset.eval()[0][0])
        if not self.groups:  # once: the model accepts the stream's inputs
            check_model_accepts("M2KDPlugin", strategy.model, example.to(next(strategy.model.parameters()).device), experience)
        self.prepare_model(strategy.model, example)

    def before_training_exp(self, strategy, **kwargs):
        self.snapshots.bind(strategy.model)
        cache = len(self.snapshots) > 0 and decide_cache(
            "M2KDPlugin", self.teacher_cache, strategy.experience.dataset, returns_features=self.aux == "features" and bool(self.aux_layers)
        )
        self._teacher_set = self._build_teachers(strategy.device, cache=cache)
        self._width_checked = False

    def before_training_epoch(self, strategy, **kwargs):
        start_epoch(self._teacher_set)

    def after_training_epoch(self, strategy, **kwargs):
        end_epoch("M2KDPlugin", self.teacher_cache, self._teacher_set, strategy.clock.train_exp_epochs)

    def before_forward(self, strategy, **kwargs):
        check_batch("M2KDPlugin", strategy.experience, strategy.mb_x, strategy.mb_y, 2**62)
        taps = self._student_taps(strategy.model)
        if taps is not None:
            taps.attach()

    def after_forward(self, strategy, **kwargs):
        if self._taps is not None:
            self._taps.detach()
            self._features = self._taps.features()
        if not self._width_checked:
            self._check_width(strategy)
        self._outputs = self._run_teachers(strategy.mb_x)

    def before_backward(self, strategy, **kwargs):
        outputs = self._outputs or []
        terms = self.loss_terms(strategy.model, strategy.mb_output, strategy.mb_y, self._features, outputs)
        self._check_finite(terms, strategy)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        strategy.loss += self.weighted_sum(terms)
        self._features = []
        self._outputs = None

    def before_update(self, strategy, **kwargs):
        self.snapshots.before_update(strategy.model)

    def after_update(self, strategy, **kwargs):
        self.snapshots.after_update(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        model = strategy.model
        self.snapshots.prune(model)
        if isinstance(self.snapshots, PackNetSnapshotStore) and self.post_prune_epochs > 0:
            self._finetune_after_pruning(strategy)
        self.snapshots.add(model)
        self.groups.append(list(self.current_classes))
        self.current_classes = []
        self._teacher_set = None
        self._outputs = None

    # -- internals ------------------------------------------------------------------------
    def _check_width(self, strategy) -> None:
        width = strategy.mb_output.shape[-1]
        needed = max(self.seen_classes()) + 1
        if width < needed:
            raise ValueError(
                f"M2KDPlugin: the model outputs {width} logits but experience "
                f"{experience_index(strategy.experience)} needs class ids up to {needed - 1}; "
                f"give the model a head with at least {needed} outputs, or use "
                "avalanche.models.IncrementalClassifier, which grows with the classes."
            )
        check_batch("M2KDPlugin", strategy.experience, strategy.mb_x, strategy.mb_y, width)
        self._width_checked = True

    def _check_finite(self, terms: Dict[str, Tensor], strategy) -> None:
        for name, value in terms.items():
            if not bool(torch.isfinite(value)):
                raise FloatingPointError(
                    f"M2KDPlugin: the {name} loss term is {float(value)} at training experience "
                    f"{experience_index(strategy.experience)}; check the inputs for NaN/inf and lower the "
                    "learning rate."
                )

    def _finetune_after_pruning(self, strategy) -> None:
        """PackNet's post-pruning fine-tuning: only the weights the new
        snapshot keeps are trained, with the experience's data and loss."""
        store = self.snapshots
        assert isinstance(store, PackNetSnapshotStore)
        model, optimizer, device = strategy.model, strategy.optimizer, strategy.device
        store.begin_finetune()
        model.train()
        try:
            for _ in range(self.post_prune_epochs):
                for batch in strategy.dataloader:
                    x, y = batch[0].to(device), batch[1].to(device)
                    optimizer.zero_grad()
                    logits, features = self._student_forward(model, x)
                    outputs = self._run_teachers(x)
                    if self.loss == "bce":
                        loss = self.classification_loss(logits, y, outputs)
                    else:
                        loss = strategy._criterion(logits, y)
                    loss = loss + self.weighted_sum(self.loss_terms(model, logits, y, features, outputs))
                    loss.backward()
                    sync_gradients(model)  # no-op in a single process
                    store.before_update(model)
                    optimizer.step()
                    store.after_update(model)
        finally:
            store.end_finetune()
        average_batchnorm_statistics(model)  # ranks fine-tuned on different shards (no-op in one process)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The plugin's whole state: configuration, class groups and snapshots
        (tensors and plain values; save with ``torch.save``). The auxiliary
        heads live in the model's own ``state_dict``."""
        return {
            "format": "avalanche_m2kd.M2KDPlugin/1",
            "config": self.config(),
            "groups": [list(g) for g in self.groups],
            "snapshots": self.snapshots.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; the configuration must match."""
        if state.get("format") != "avalanche_m2kd.M2KDPlugin/1":
            raise ValueError("not an M2KDPlugin state (missing or unknown 'format')")
        if state["config"] != self.config():
            diff = {k: (v, self.config().get(k)) for k, v in state["config"].items() if self.config().get(k) != v}
            raise ValueError(f"M2KDPlugin state was saved with another configuration (saved, current): {diff}")
        self.groups = [list(g) for g in state["groups"]]
        self.snapshots.load_state_dict(state["snapshots"])
        self._teacher_set = None


__all__ = ["M2KDPlugin"]
