"""Snapshot stores: how M2KD keeps the model of every past experience.

Three kinds share one interface (:class:`SnapshotStore`):

``full``
    A frozen copy of the whole ``state_dict`` per snapshot. Exact.
``packnet``
    PackNet-style weight ownership (Mallya & Lazebnik 2018), our reading of the
    M2KD paper's "mask-based pruning". Every weight of a prunable layer
    (convolution / linear, heads excluded) has an owner: 0 = free, k = frozen
    by snapshot k. After an experience the free weights are pruned by
    magnitude (``prune_ratio`` of them stay free and are zeroed), the rest
    become owned by the new snapshot and are frozen for good. Snapshot k is
    rebuilt from the live weights owned by 1..k plus the small state stored
    beside it (BatchNorm parameters and statistics, biases, heads). One
    ``uint8`` per prunable weight serves all snapshots together. The price:
    experience ``t`` can only train ``prune_ratio ** (t - 1)`` of the weights.
``sparse``
    A magnitude-pruned copy per snapshot: ``prune_ratio`` of each prunable
    weight tensor is dropped; the rest is stored as a bitmask plus values.
    Training is unconstrained; the teacher is an approximation.

Every kind can also drop the head rows a snapshot will never be read at
(:meth:`SnapshotStore.keep_head_rows`): M2KD reads snapshot ``k`` only at the
columns of the classes it teaches, and a head holds a row for every class id up
to the largest seen, so most rows of an early snapshot's heads are dead weight.

Snapshots are plain dictionaries of tensors. A teacher is rebuilt into a copy
of the live model, re-shaping tensors whose size differs (a head that has grown
since the snapshot was taken), so the rebuilt module behaves exactly like the
model did, output width included.
"""

from __future__ import annotations

import copy
import warnings
from typing import Dict, Iterable, List, Literal, Optional, Sequence

import torch
from avalanche.models import IncrementalClassifier
from torch import Tensor, nn

from .taps import AUX_ATTRIBUTE

StoreKind = Literal["full", "packnet", "sparse"]
PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
StateDict = Dict[str, Tensor]


def state_nbytes(state: StateDict | Iterable[Tensor]) -> int:
    """Bytes held by the tensors of a state dict (or an iterable of tensors)."""
    tensors = state.values() if isinstance(state, dict) else state
    return sum(t.numel() * t.element_size() for t in tensors)


def head_module_names(model: nn.Module, head_layers: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the classifier heads, whose rows follow the classes and are
    therefore stored per snapshot rather than shared.

    Default: every ``IncrementalClassifier`` and the auxiliary heads; when the
    model has no ``IncrementalClassifier``, its last ``nn.Linear``.
    """
    modules = dict(model.named_modules())
    if head_layers is not None:
        missing = [n for n in head_layers if n not in modules]
        if missing:
            raise ValueError(f"head_layers: {missing} not found in {type(model).__name__}")
        heads = list(head_layers)
    else:
        heads = [n for n, m in modules.items() if isinstance(m, IncrementalClassifier)]
        if not heads:
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not n.startswith(AUX_ATTRIBUTE)]
            heads = linears[-1:]
    if AUX_ATTRIBUTE in modules:
        heads.append(AUX_ATTRIBUTE)
    return heads


def prunable_weight_names(model: nn.Module, head_layers: Optional[Sequence[str]] = None) -> List[str]:
    """``state_dict`` names of the weights that snapshots prune or share: the
    ``weight`` of every convolution and linear layer outside the heads."""
    heads = head_module_names(model, head_layers)

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES) and not in_head(name)
    ]


def class_row_layers(model: nn.Module, head_layers: Optional[Sequence[str]] = None) -> List[str]:
    """Names of the linear layers whose rows are classes: each head's output
    layer, taken as the last ``nn.Linear`` of each module inside a head that
    holds linear layers itself (a custom head's hidden layer is left whole)."""
    modules = dict(model.named_modules())
    layers: List[str] = []
    for head in head_module_names(model, head_layers):
        if isinstance(modules[head], nn.Linear):
            layers.append(head)
            continue
        last_of_parent: Dict[str, str] = {}
        for name, module in modules[head].named_modules(prefix=head):
            if isinstance(module, nn.Linear):
                last_of_parent[name.rpartition(".")[0]] = name
        layers.extend(last_of_parent.values())
    return list(dict.fromkeys(layers))  # an auxiliary head's classifier is a head inside a head


# Encoding of a head layer whose rows were dropped (keep_head_rows): the kept
# rows' indices, the full row count, and each tensor's kept rows.
_ROWS, _HEIGHT, _KEPT = "#rows", "#height", "#kept"


def _expand_head_rows(stored: StateDict) -> StateDict:
    """``stored`` with every row-dropped head tensor rebuilt at full height
    (zeros in the dropped rows); a new dictionary, ``stored`` is not changed."""
    if not any(name.endswith(_ROWS) for name in stored):
        return stored
    state: StateDict = {}
    for name, value in stored.items():
        if name.endswith(_KEPT):
            base = name[: -len(_KEPT)]
            layer = base.rpartition(".")[0]
            full = value.new_zeros((int(stored[layer + _HEIGHT]),) + tuple(value.shape[1:]))
            full[stored[layer + _ROWS]] = value
            state[base] = full
        elif not (name.endswith(_ROWS) or name.endswith(_HEIGHT)):
            state[name] = value
    return state


def _detached_state(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_state_reshaped(module: nn.Module, state: StateDict) -> nn.Module:
    """Load ``state`` into ``module``, replacing tensors whose shape differs.

    A snapshot taken before a head grew has fewer rows than the live model;
    rather than needing the old architecture, the tensors are swapped in at
    their stored size (linear layers read their size from their weight).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            "snapshot does not match the model's architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    table = dict(module.named_modules())
    for name, value in state.items():
        owner_name, _, attr = name.rpartition(".")
        owner = table[owner_name]
        current = getattr(owner, attr)
        if current is not None and current.shape == value.shape:
            current.data.copy_(value)
        elif isinstance(current, nn.Parameter) or attr in owner._parameters:
            setattr(owner, attr, nn.Parameter(value.clone(), requires_grad=False))
        else:
            owner._buffers[attr] = value.clone()
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = value.shape
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients: how every teacher in this library is used."""
    module.eval()
    module.requires_grad_(False)
    return module


def _pack_bits(mask: Tensor) -> Tensor:
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(bits: Tensor, shape: torch.Size) -> Tensor:
    shifts = torch.arange(7, -1, -1, device=bits.device, dtype=torch.uint8)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).flatten().bool()
    n = 1
    for s in shape:
        n *= s
    return flat[:n].view(shape)


def _top_mask(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` largest entries of ``scores``."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        idx = scores.flatten().topk(keep, sorted=False).indices
        mask.view(-1)[idx] = True
    return mask


class SnapshotStore:
    """Keeps one snapshot per finished experience and rebuilds it as a teacher.

    Indices are 0-based in training order: ``teacher(k)`` behaves like the
    model at the end of the k-th training experience.

    The store is bound to the live model (``bind``), which provides the
    architecture for rebuilding teachers (and, for ``packnet``, the shared
    weights). ``nbytes()`` counts the tensors the store really holds;
    ``full_copy_nbytes()`` what full ``state_dict`` copies would take.
    """

    kind: StoreKind = "full"

    def __init__(self, head_layers: Optional[Sequence[str]] = None):
        self.head_layers = list(head_layers) if head_layers is not None else None
        self._snapshots: List[StateDict] = []
        self._full_bytes: List[int] = []
        self._model: Optional[nn.Module] = None

    # -- binding and training-time hooks (no-ops except for packnet) ---------
    def bind(self, model: nn.Module) -> None:
        """Use ``model`` as the live model (architecture, shared weights)."""
        self._model = model

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("SnapshotStore: no model bound; call bind(model) (the plugin does this at training)")
        return self._model

    def constrains_training(self) -> bool:
        """Whether some weights must not move during training."""
        return False

    def before_update(self, model: nn.Module) -> None:
        """Called before each optimizer step."""

    def after_update(self, model: nn.Module) -> None:
        """Called after each optimizer step."""

    def prune(self, model: nn.Module) -> None:
        """End of an experience, before ``add``: decide what the new snapshot keeps."""

    # -- snapshots ------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._snapshots)

    def add(self, model: nn.Module) -> int:
        """Record the model as the next snapshot; returns its index."""
        self.bind(model)
        full = _detached_state(model)
        self._full_bytes.append(state_nbytes(full))
        self._snapshots.append(self._encode(model, full))
        return len(self._snapshots) - 1

    def _encode(self, model: nn.Module, full: StateDict) -> StateDict:
        return {k: v.cpu() for k, v in full.items()}

    def _decode(self, k: int) -> StateDict:
        return self._snapshots[k]

    def release(self, k: int) -> None:
        """Free what snapshot ``k`` holds of its own; its index stays, and it can
        no longer be rebuilt (M2KD's ``teachers="last"`` needs the newest only).
        PackNet's shared weights stay: later snapshots own them too."""
        self._check_index(k)
        self._snapshots[k] = {}
        self._full_bytes[k] = 0

    def released(self, k: int) -> bool:
        """Whether snapshot ``k`` was released."""
        self._check_index(k)
        return not self._snapshots[k]

    def _check_index(self, k: int) -> None:
        if not 0 <= k < len(self):
            raise IndexError(f"snapshot {k} does not exist; the store holds {len(self)}")

    def snapshot_state(self, k: int) -> StateDict:
        """The full ``state_dict`` of snapshot ``k`` as the teacher sees it."""
        if self.released(k):
            raise ValueError(f"snapshot {k} was released (M2KD with teachers='last' keeps only the newest snapshot)")
        return _expand_head_rows(self._decode(k))

    def keep_head_rows(self, k: int, classes: Sequence[int]) -> None:
        """Keep, in snapshot ``k``'s class heads (:func:`class_row_layers`), only
        the rows of ``classes``: the outputs its teacher will be read at. The
        rebuilt teacher has zero weights and bias in the other rows, so its
        logits there are 0 (or the head's mask value), while the kept columns
        are computed exactly as before. Rows can be dropped further later, never
        brought back."""
        if self.released(k):
            raise ValueError(f"snapshot {k} was released; it has no head rows to keep")
        rows = torch.tensor(sorted({int(c) for c in classes}), dtype=torch.long)
        layers = class_row_layers(self.model, self.head_layers)
        stored = self._snapshots[k]
        for layer in layers:
            kept = stored.get(layer + _ROWS)
            if kept is not None and not bool(torch.isin(rows, kept).all()):
                lost = sorted(set(rows.tolist()) - set(kept.tolist()))
                raise ValueError(f"snapshot {k}: the rows of {layer} for classes {lost} were dropped already")
        full = _expand_head_rows(stored)
        names = {layer: [n for n in (f"{layer}.weight", f"{layer}.bias") if n in full] for layer in layers}
        rows_of_classes = {n for own in names.values() for n in own}
        encoded = {n: v for n, v in full.items() if n not in rows_of_classes}
        for layer, own in names.items():
            if not own:
                continue
            height = full[own[0]].shape[0]
            if rows.numel() and int(rows[-1]) >= height:
                raise ValueError(f"snapshot {k}: head layer {layer} has {height} rows, none for class {int(rows[-1])}")
            if rows.numel() == height:  # every row read: stored whole, without indices
                encoded.update({name: full[name] for name in own})
                continue
            encoded[layer + _ROWS] = rows.clone()
            encoded[layer + _HEIGHT] = torch.tensor(height)
            for name in own:
                encoded[name + _KEPT] = full[name][rows].clone()
        self._snapshots[k] = encoded

    def teacher(self, k: int, device: Optional[torch.device | str] = None) -> nn.Module:
        """Snapshot ``k`` rebuilt as a frozen, eval-mode module."""
        state = self.snapshot_state(k)
        module = copy.deepcopy(self.model)
        load_state_reshaped(module, state)
        if device is not None:
            module.to(device)
        return freeze(module)

    # -- accounting -----------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of tensors the store holds (the live model's own weights excluded)."""
        return sum(state_nbytes(s) for s in self._snapshots)

    def full_copy_nbytes(self) -> int:
        """Bytes that full ``state_dict`` copies of the snapshots held would take."""
        return sum(self._full_bytes)

    # -- persistence ------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to restore the store (tensors and plain values only)."""
        return {
            "kind": self.kind,
            "snapshots": [dict(s) for s in self._snapshots],
            "full_bytes": list(self._full_bytes),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"snapshot store state is of kind {state.get('kind')!r}, this store is {self.kind!r}")
        self._snapshots = [dict(s) for s in state["snapshots"]]
        self._full_bytes = list(state["full_bytes"])


class FullSnapshotStore(SnapshotStore):
    """A frozen copy of the whole ``state_dict`` per snapshot (4 bytes per float)."""

    kind: StoreKind = "full"


class SparseSnapshotStore(SnapshotStore):
    """Per snapshot, a magnitude-pruned copy: ``prune_ratio`` of every prunable
    weight tensor is dropped, the rest stored as a bitmask plus float32 values;
    the other tensors (BatchNorm, biases, heads) are stored whole."""

    kind: StoreKind = "sparse"

    def __init__(self, prune_ratio: float = 0.75, head_layers: Optional[Sequence[str]] = None):
        super().__init__(head_layers)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        self.prune_ratio = prune_ratio

    def _encode(self, model: nn.Module, full: StateDict) -> StateDict:
        encoded: StateDict = {}
        prunable = set(prunable_weight_names(model, self.head_layers))
        for name, value in full.items():
            value = value.cpu()
            if name in prunable:
                keep = int(round((1.0 - self.prune_ratio) * value.numel()))
                mask = _top_mask(value.abs(), keep)
                encoded[name + "#bits"] = _pack_bits(mask)
                encoded[name + "#values"] = value[mask]
                encoded[name + "#shape"] = torch.tensor(list(value.shape), dtype=torch.int32)
            else:
                encoded[name] = value
        return encoded

    def _decode(self, k: int) -> StateDict:
        stored = self._snapshots[k]
        state: StateDict = {}
        for name, value in stored.items():
            if name.endswith("#values") or name.endswith("#shape"):
                continue
            if name.endswith("#bits"):
                base = name[: -len("#bits")]
                shape = torch.Size(stored[base + "#shape"].tolist())
                mask = _unpack_bits(value, shape)
                values = stored[base + "#values"]
                weight = torch.zeros(shape, dtype=values.dtype)
                weight[mask] = values
                state[base] = weight
            else:
                state[name] = value
        return state

    def state_dict(self) -> dict:
        return {**super().state_dict(), "prune_ratio": self.prune_ratio}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prune_ratio = state["prune_ratio"]


class PackNetSnapshotStore(SnapshotStore):
    """PackNet-style ownership masks over the live model's weights.

    See the module docstring. ``owners[name]`` (``uint8``, one per prunable
    weight, shared by all snapshots) is 0 for a free weight and ``k + 1`` for a
    weight frozen by snapshot ``k``. Frozen weights are restored after every
    optimizer step, so gradients, momentum and weight decay cannot move them
    (bit-identical, whatever the optimizer).
    """

    kind: StoreKind = "packnet"
    MAX_SNAPSHOTS = 255

    def __init__(self, prune_ratio: float = 0.75, head_layers: Optional[Sequence[str]] = None):
        super().__init__(head_layers)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio}")
        if prune_ratio == 0.0:
            warnings.warn(
                "packnet with prune_ratio=0 frees no weight: after the first experience every convolution and "
                "linear weight outside the heads is frozen, and later experiences train only biases, BatchNorm "
                "and heads; use a ratio such as 0.75",
                UserWarning,
                stacklevel=3,
            )
        self.prune_ratio = prune_ratio
        self.owners: Dict[str, Tensor] = {}
        self._pruned_for: Optional[int] = None  # snapshot index whose pruning is done
        self._trainable_owner = 0  # 0 while training on free weights; k+1 while fine-tuning snapshot k
        self._saved: Dict[str, Tensor] = {}

    # -- ownership ----------------------------------------------------------------
    def _weights(self, model: nn.Module) -> Dict[str, Tensor]:
        state = dict(model.named_parameters())
        names = prunable_weight_names(model, self.head_layers)
        if not self.owners:
            self.owners = {n: torch.zeros_like(state[n], dtype=torch.uint8) for n in names}
        if set(names) != set(self.owners):
            raise ValueError(
                "packnet: the model's prunable layers changed since the first snapshot "
                f"({sorted(set(names) ^ set(self.owners))[:5]}); packnet needs a fixed backbone"
            )
        weights = {}
        for n in names:
            w = state[n]
            if w.shape != self.owners[n].shape:
                raise ValueError(f"packnet: weight {n} changed shape {tuple(self.owners[n].shape)} -> {tuple(w.shape)}")
            if self.owners[n].device != w.device:
                self.owners[n] = self.owners[n].to(w.device)
            weights[n] = w
        return weights

    def bind(self, model: nn.Module) -> None:
        super().bind(model)
        self._weights(model)

    def constrains_training(self) -> bool:
        return len(self) > 0 or self._pruned_for is not None

    def free_fraction(self) -> float:
        """Fraction of prunable weights still free to train."""
        total = sum(o.numel() for o in self.owners.values())
        free = sum(int((o == 0).sum()) for o in self.owners.values())
        return free / total if total else 1.0

    def _frozen_mask(self, name: str) -> Tensor:
        owner = self.owners[name]
        return owner != self._trainable_owner

    def before_update(self, model: nn.Module) -> None:
        if not self.constrains_training():
            return
        self._saved = {}
        for name, w in self._weights(model).items():
            if w.grad is not None:
                w.grad.masked_fill_(self._frozen_mask(name), 0.0)
            self._saved[name] = w.detach().clone()

    @torch.no_grad()
    def after_update(self, model: nn.Module) -> None:
        if not self._saved:
            return
        for name, w in self._weights(model).items():
            w.copy_(torch.where(self._frozen_mask(name), self._saved[name], w))
        self._saved = {}

    @torch.no_grad()
    def prune(self, model: nn.Module) -> None:
        """Give the largest ``1 - prune_ratio`` of each layer's free weights to
        the next snapshot; zero the rest (they stay free)."""
        k = len(self)
        if self._pruned_for == k:
            return
        if k + 1 > self.MAX_SNAPSHOTS:
            raise ValueError(f"packnet: at most {self.MAX_SNAPSHOTS} snapshots fit in uint8 owners")
        self.bind(model)
        for name, w in self._weights(model).items():
            owner = self.owners[name]
            free = owner == 0
            n_free = int(free.sum())
            keep = int(round((1.0 - self.prune_ratio) * n_free))
            magnitude = torch.where(free, w.abs(), torch.full_like(w, -torch.inf))
            kept = _top_mask(magnitude, keep) & free
            owner[kept] = k + 1
            w.masked_fill_(free & ~kept, 0.0)
        self._pruned_for = k

    def begin_finetune(self) -> None:
        """Train only the weights the pending snapshot owns (post-prune fine-tuning)."""
        if self._pruned_for is None:
            raise RuntimeError("packnet: prune() must run before fine-tuning")
        self._trainable_owner = self._pruned_for + 1

    def end_finetune(self) -> None:
        self._trainable_owner = 0

    def add(self, model: nn.Module) -> int:
        self.prune(model)
        self.end_finetune()
        index = super().add(model)
        self._pruned_for = None
        return index

    def _encode(self, model: nn.Module, full: StateDict) -> StateDict:
        shared = set(self.owners)
        return {k: v.cpu() for k, v in full.items() if k not in shared}

    def _decode(self, k: int) -> StateDict:
        state = dict(self._snapshots[k])
        live = self.model.state_dict()
        for name, owner in self.owners.items():
            mask = (owner >= 1) & (owner <= k + 1)
            state[name] = (live[name].detach() * mask).cpu()
        return state

    def nbytes(self) -> int:
        return super().nbytes() + state_nbytes(self.owners)

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "prune_ratio": self.prune_ratio,
            "owners": {k: v.cpu() for k, v in self.owners.items()},
            "pruned_for": self._pruned_for,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prune_ratio = state["prune_ratio"]
        self.owners = {k: v.clone() for k, v in state["owners"].items()}
        self._pruned_for = state["pruned_for"]
        self._trainable_owner = 0


def make_snapshot_store(
    kind: StoreKind = "full", prune_ratio: float = 0.75, head_layers: Optional[Sequence[str]] = None
) -> SnapshotStore:
    """Build a store by name: ``"full"``, ``"packnet"`` or ``"sparse"``."""
    if kind == "full":
        return FullSnapshotStore(head_layers)
    if kind == "packnet":
        return PackNetSnapshotStore(prune_ratio, head_layers)
    if kind == "sparse":
        return SparseSnapshotStore(prune_ratio, head_layers)
    raise ValueError(f"snapshot_store: unknown kind {kind!r}; use 'full', 'packnet' or 'sparse'")


__all__ = [
    "FullSnapshotStore",
    "PackNetSnapshotStore",
    "SnapshotStore",
    "SparseSnapshotStore",
    "class_row_layers",
    "freeze",
    "head_module_names",
    "load_state_reshaped",
    "make_snapshot_store",
    "prunable_weight_names",
    "state_nbytes",
]
