"""M2KD as an Avalanche plugin: the hooks that call
:class:`~avalanche_m2kd.M2KDRegularizer` (Zhou et al., BMVC 2020)."""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, List, Optional

import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from torch import Tensor

from .._cache import decide_cache, end_epoch, start_epoch
from .._experience import (
    accumulate_nonfinite,
    batch_augmentation,
    check_batch,
    check_finite_terms,
    check_is_criterion,
    check_listed_once,
    check_nonfinite_flags,
    check_output_width,
)
from .._random import own_random_stream
from ..distributed import average_batchnorm_statistics
from ..precision import scaler_skips_non_finite
from ..regularizer import M2KDRegularizer
from ..snapshots import PackNetSnapshotStore

_FINETUNE_STREAM = 0x706B6674  # salt of the post-pruning fine-tune's own random stream (see _random)
_OWNER = "M2KDPlugin"


class M2KDPlugin(SupervisedPlugin, supports_distributed=True):
    """Multi-model and multi-level knowledge distillation (M2KD) in an
    Avalanche strategy: the hooks that run an
    :class:`~avalanche_m2kd.M2KDRegularizer` (``plugin.regularizer``, which
    holds the method's arguments, documented there) at the right moments, as
    Avalanche's ``LwFPlugin`` runs ``LearningWithoutForgetting``.

    With ``loss="bce"`` (iCaRL's form) the classification loss itself is
    replaced, so the plugin must also be the strategy's ``criterion`` (the
    :class:`~avalanche_m2kd.M2KD` strategy does this).

    Args:
        regularizer: the regularizer to run; default: one built from
            ``**regularizer_args``.
        post_prune_epochs: ``snapshot_store="packnet"`` only: epochs of
            fine-tuning after pruning, training only the weights the new
            snapshot keeps, through the strategy's own training loop (its data,
            replay included, every plugin's loss terms and hooks). Default 2
            [ours]: on Split-Digits one epoch after pruning 75% left the digits
            CNN at chance on its own classes, two recovered it fully (measured);
            PackNet uses 10.
        post_prune_lr: learning rate of that fine-tuning. Default None = the
            rate of the experience's last epoch [ours] (PackNet fine-tunes at a
            low rate; a scheduler plugin that resets the rate at the end of the
            experience must not turn the fine-tune into a step at the base rate).
        check_batches: check every batch (finite inputs, labels inside the
            head, finite loss terms) at once, instead of the first batch of each
            experience only. Default False [ours]: each check reads values back
            from the device, a stall per batch on a GPU. Then the other batches'
            loss terms are checked on the device and read once per epoch.
        **regularizer_args: :class:`~avalanche_m2kd.M2KDRegularizer`'s arguments.
    """

    def __init__(
        self,
        regularizer: Optional[M2KDRegularizer] = None,
        *,
        post_prune_epochs: int = 2,
        post_prune_lr: Optional[float] = None,
        check_batches: bool = False,
        **regularizer_args,
    ):
        super().__init__()
        if regularizer is not None and regularizer_args:
            raise ValueError(f"{_OWNER}: give a regularizer or its arguments ({', '.join(regularizer_args)}), not both")
        try:
            self.regularizer = regularizer or M2KDRegularizer(**regularizer_args)
        except (TypeError, ValueError) as err:
            raise type(err)(str(err).replace("M2KDRegularizer", _OWNER)) from None
        packnet = self.regularizer.snapshots.kind == "packnet"
        if post_prune_epochs < 0:
            raise ValueError(f"{_OWNER}: post_prune_epochs must be >= 0, got {post_prune_epochs}")
        if post_prune_lr is not None and post_prune_lr <= 0:
            raise ValueError(f"{_OWNER}: post_prune_lr must be > 0, got {post_prune_lr}")
        if not packnet and (post_prune_epochs != 2 or post_prune_lr is not None):
            raise ValueError(f"{_OWNER}: post_prune_epochs and post_prune_lr apply only with snapshot_store='packnet'")
        self.post_prune_epochs = int(post_prune_epochs)
        self.post_prune_lr = post_prune_lr
        self.check_batches = bool(check_batches)
        self.last_terms: Dict[str, Tensor] = {}
        """Unweighted loss terms of the last training iteration (detached)."""
        # Per-batch state Avalanche forces: the criterion (loss="bce") receives only the logits and
        # labels, so the terms computed in after_forward from the inputs wait here for it.
        self._terms: Optional[Dict[str, Tensor]] = None
        self._taps = contextlib.nullcontext()  # entered in before_forward, left in after_forward
        self._checked_this_experience = False
        self._nonfinite: Dict[str, Tensor] = {}
        self._epoch_lrs: List[float] = []

    # -- what users read ----------------------------------------------------------------
    @property
    def snapshots(self):
        """The regularizer's snapshot store."""
        return self.regularizer.snapshots

    @property
    def groups(self) -> List[List[int]]:
        """Classes introduced by each finished experience."""
        return self.regularizer.groups

    @property
    def loss(self) -> str:
        return self.regularizer.loss

    def config(self) -> dict:
        """The regularizer's arguments and the plugin's own (for result files and checkpoints)."""
        return {**self.regularizer.config(), **self._options()}

    def _options(self) -> dict:
        return {"post_prune_epochs": self.post_prune_epochs, "post_prune_lr": self.post_prune_lr, "check_batches": self.check_batches}

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The criterion for ``loss="bce"``: during training the current batch's
        ``classification`` term; in evaluation, the plain one-hot sigmoid loss."""
        if self._terms is None:
            return F.binary_cross_entropy_with_logits(logits, F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype))
        return self._terms["classification"]

    # -- Avalanche hooks ---------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        check_listed_once(_OWNER, self, strategy)
        if self.loss == "bce":
            check_is_criterion(f"{_OWNER}(loss='bce')", self, strategy, "the M2KD strategy")

    def before_train_dataset_adaptation(self, strategy, **kwargs):
        self.regularizer.pre_adapt(strategy.model, strategy.experience)  # before model adaptation grows the heads

    def before_training_exp(self, strategy, **kwargs):
        reg = self.regularizer
        reg.snapshots.bind(strategy.model)
        cache = len(reg.snapshots) > 0 and decide_cache(
            _OWNER, reg.teacher_cache, strategy.experience.dataset,
            returns_features=reg.aux == "features" and bool(reg.aux_layers), batch_augmented=batch_augmentation(strategy) is not None,
        )
        reg.build_teachers(strategy.device, cache=cache)
        self._checked_this_experience = False
        self._nonfinite = {}

    def before_training_epoch(self, strategy, **kwargs):
        start_epoch(self.regularizer.teacher_set)
        self._epoch_lrs = [g["lr"] for g in strategy.optimizer.param_groups]

    def after_training_epoch(self, strategy, **kwargs):
        end_epoch(_OWNER, self.regularizer.teacher_cache, self.regularizer.teacher_set, strategy.clock.train_exp_epochs)
        check_nonfinite_flags(_OWNER, self._nonfinite, strategy.experience)  # one device read per epoch

    def before_forward(self, strategy, **kwargs):
        # The tapped layers' outputs exist only inside the forward pass: record them around it.
        self._taps = self.regularizer.taps(strategy.model)
        self._taps.__enter__()

    def after_forward(self, strategy, **kwargs):
        self._taps.__exit__(None, None, None)
        checked = not self._checked_this_experience or self.check_batches
        if not self._checked_this_experience:
            check_output_width(_OWNER, strategy, max(self.regularizer.seen_classes()) + 1)
            self._checked_this_experience = True
        elif self.check_batches:
            check_batch(_OWNER, strategy.experience, strategy.mb_x, strategy.mb_y, strategy.mb_output.shape[-1])
        terms = self.regularizer(strategy.mb_x, strategy.mb_output, strategy.mb_y, strategy.model)
        if not scaler_skips_non_finite(strategy):  # fp16: the scaler skips non-finite steps itself
            if checked:
                check_finite_terms(_OWNER, terms, strategy.experience)
            else:
                accumulate_nonfinite(self._nonfinite, terms)  # read at the end of the epoch
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        if any(k != "classification" for k in terms):  # the strategy adds its criterion after this hook
            strategy.loss += self.regularizer.total(terms, exclude=("classification",))
        self._terms = terms

    def before_backward(self, strategy, **kwargs):
        self._terms = None

    def before_update(self, strategy, **kwargs):
        self.regularizer.snapshots.before_update(strategy.model)

    def after_update(self, strategy, **kwargs):
        self.regularizer.snapshots.after_update(strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        store = self.regularizer.snapshots
        if isinstance(store, PackNetSnapshotStore) and self.post_prune_epochs > 0:
            store.prune(strategy.model)
            self._finetune_after_pruning(strategy, store)
        self.regularizer.post_adapt(strategy.model, strategy.experience)
        self._terms = None

    def _finetune_after_pruning(self, strategy, store: PackNetSnapshotStore) -> None:
        """PackNet's post-pruning fine-tuning: only the weights the new
        snapshot keeps are trained, through the strategy's own training loop
        (its data, every plugin's loss terms and hooks), at ``post_prune_lr``."""
        optimizer = strategy.optimizer
        saved = [g["lr"] for g in optimizer.param_groups]
        rates = [self.post_prune_lr] * len(saved) if self.post_prune_lr is not None else (self._epoch_lrs or saved)
        for group, lr in zip(optimizer.param_groups, rates):
            group["lr"] = lr
        store.begin_finetune()
        strategy.model.train()
        try:
            with own_random_stream(_FINETUNE_STREAM):  # its batches leave the run's data stream where full snapshots leave it
                for _ in range(self.post_prune_epochs):
                    strategy.training_epoch()
                    check_nonfinite_flags(_OWNER, self._nonfinite, strategy.experience)
        finally:
            store.end_finetune()
            for group, lr in zip(optimizer.param_groups, saved):
                group["lr"] = lr
        average_batchnorm_statistics(strategy.model)  # ranks fine-tuned on different shards (no-op in one process)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The regularizer's state (configuration, class groups, snapshots) and
        the plugin's options."""
        return {**self.regularizer.state_dict(), "plugin": self.config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned; every option must match."""
        self.regularizer.load_state_dict(state)
        own = self._options()
        saved = {**own, **{k: v for k, v in (state.get("plugin") or state["config"]).items() if k in own}}
        if state.get("plugin") is None:  # saved before the regularizer existed: check_batches was not recorded
            saved["check_batches"] = own["check_batches"]
        if saved != own:
            raise ValueError(f"M2KD state was saved with other plugin options (saved, current): {saved}, {own}")
        self._terms = None


# help() and the M2KD strategy's check of unexpected arguments see the regularizer's arguments too
M2KDPlugin.__init__.__signature__ = inspect.Signature(
    [p for p in inspect.signature(M2KDPlugin.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    + [p.replace(kind=p.KEYWORD_ONLY) for n, p in inspect.signature(M2KDRegularizer.__init__).parameters.items() if n != "self"]
)

__all__ = ["M2KDPlugin"]
