"""Frozen teachers that each own a class group: the machinery M2KD's snapshots
and ED's stage teachers share.

A :class:`GroupTeacher` is a frozen module plus the global classes it owns and
the output columns where it predicts them (M2KD's snapshots predict global
classes, so ``columns == classes``; ED's stage teachers predict local labels,
so ``columns == range(len(classes))``). A :class:`TeacherSet` runs them:
every teacher (or a chosen subset) on the whole batch (M2KD), or each sample
through the teacher of its own group (ED); optionally

* **batched**: all teachers in one ``torch.func.vmap`` pass over their stacked
  weights instead of a Python loop (same architecture required);
* **cached**: each teacher's outputs stored per input, keyed by a fingerprint
  of the input's exact bits, so an input seen again (the next epoch, with a
  deterministic transform) costs no forward pass. Exact by construction: a hit
  means bit-identical input to a frozen, eval-mode teacher;
* **fused** (the default): each teacher runs as a copy with every BatchNorm
  that only follows a convolution folded into it (:func:`fold_batchnorm`) and,
  for image inputs, in channels-last layout: the same function up to float
  rounding; on this project's CPU a bf16 snapshot pass inside M2KD takes 54 ms
  instead of 66 (README speed table).
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, get_args

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ._random import rng_state, set_rng_state
from .losses import TeacherOutput, class_position_table
from .precision import Precision, autocast, check_precision
from .snapshots import freeze, load_state_reshaped
from .taps import AUX_ATTRIBUTE, FeatureTaps


def draw_teachers(
    weights: Sequence[float], k: Optional[int], generator: Optional[torch.Generator] = None
) -> Tuple[List[int], List[float]]:
    """Which teachers a batch uses, and with what weights.

    ``k=None`` (or a single teacher): all of them, with ``weights``. Otherwise
    ``k`` draws with replacement, teacher ``j`` with probability ``weights[j]``
    (which must sum to 1); each drawn teacher is weighted by its count over
    ``k``. Since ``E[count_j / k] = weights[j]``, the weighted loss is an
    unbiased estimate of the full weighted loss at ``k`` forwards per batch.
    """
    if k is None or len(weights) <= 1:
        return list(range(len(weights))), list(weights)
    draws = torch.multinomial(torch.tensor(list(weights), dtype=torch.float64), k, replacement=True, generator=generator)
    counts = torch.bincount(draws, minlength=len(weights)).tolist()
    chosen = [j for j, c in enumerate(counts) if c > 0]
    return chosen, [counts[j] / k for j in chosen]


class GroupTeacher:
    """A frozen module owning the global classes ``classes``, predicted at its
    output columns ``columns`` (same order)."""

    def __init__(self, module: nn.Module, classes: Sequence[int], columns: Optional[Sequence[int]] = None):
        self.module = freeze(module)
        self.classes = [int(c) for c in classes]
        self.columns = [int(c) for c in (self.classes if columns is None else columns)]
        if len(self.columns) != len(self.classes):
            raise ValueError(f"GroupTeacher: {len(self.classes)} classes but {len(self.columns)} output columns")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"GroupTeacher: repeated classes in {self.classes}")
        self._column_index: Optional[Tensor] = None

    def column_index(self, device: torch.device) -> Tensor:
        if self._column_index is None or self._column_index.device != device:
            self._column_index = torch.as_tensor(self.columns, dtype=torch.long, device=device)
        return self._column_index


def group_teachers(specs: Sequence, caller: str) -> List["GroupTeacher"]:
    """``GroupTeacher`` objects or ``(module, classes)`` pairs (the module's
    outputs are ``classes`` in that order) as ``GroupTeacher`` objects; each
    must own at least one class and no class may have two owners."""
    teachers, owner = [], {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, GroupTeacher):
            try:
                module, classes = spec
            except (TypeError, ValueError):
                raise ValueError(f"{caller}: teachers[{i}] must be a GroupTeacher or a (module, classes) pair") from None
            spec = GroupTeacher(module, classes, columns=range(len(classes)))
        if not spec.classes:
            raise ValueError(f"{caller}: teacher {i} covers no class")
        for c in spec.classes:
            if c in owner:
                raise ValueError(f"{caller}: class {c} is covered by teachers {owner[c]} and {i}; each class needs one owner")
            owner[c] = i
        teachers.append(spec)
    return teachers


def train_group_teacher(
    module: nn.Module,
    dataset,
    classes: Sequence[int],
    epochs: int,
    optimizer_factory: Callable,
    scheduler_factory: Callable,
    batch_size: int,
    device: torch.device | str = "cpu",
    lrs: Optional[List[float]] = None,
    precision: Precision = "fp32",
    augment: Optional[Callable[[Tensor], Tensor]] = None,
    resume: Optional[dict] = None,
    on_epoch_end: Optional[Callable[[dict], None]] = None,
) -> "GroupTeacher":
    """Train ``module`` (``len(classes)`` outputs) by cross-entropy on the
    samples of ``dataset`` (training transforms), global labels ``classes[i]``
    mapped to local label ``i``; ``scheduler_factory(optimizer, epochs)`` is
    stepped once per epoch and each epoch's learning rate appended to ``lrs``.
    ``precision`` runs each forward pass under its own autocast context (as
    :class:`~avalanche_m2kd.precision.MixedPrecisionPlugin` does): autocast
    keeps each weight's low-precision copy until its context exits, so one
    context around the whole loop would run every forward on the first step's
    weights, and nothing would be learned. ``augment``: applied to each batch
    on the device (the augmentation a :class:`~avalanche_m2kd.DeviceDataPlugin`
    took out of the dataset's transforms). Returns the frozen :class:`GroupTeacher`.

    Long teachers survive a stop: ``on_epoch_end(state)`` receives, after each
    epoch, everything needed to continue (epochs done, module, optimizer and
    scheduler states, the random states that shuffle and augment: a copy, to
    save with ``torch.save``), and ``resume=state`` continues from it in a fresh process,
    giving the weights the uninterrupted run gives (tested bit for bit)."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    classes = [int(c) for c in classes]
    optimizer = optimizer_factory(module.parameters())
    lookup = class_position_table(classes, device)
    data = dataset.train() if hasattr(dataset, "train") else dataset
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=getattr(data, "collate_fn", None))
    scheduler = scheduler_factory(optimizer, epochs)
    done_lrs: List[float] = []
    if resume is not None:
        if resume.get("format") != _TEACHER_PROGRESS or resume.get("epochs") != epochs:
            raise ValueError(
                f"train_group_teacher: the resume state is not from a {epochs}-epoch training "
                f"(it was saved by one of {resume.get('epochs')} epochs); start without it"
            )
        module.load_state_dict(resume["module"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["random"])  # the next epoch shuffles and augments as the uninterrupted run
        done_lrs = list(resume["lrs"])
    module.train()
    for _ in range(len(done_lrs), epochs):
        done_lrs.append(optimizer.param_groups[0]["lr"])
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            if augment is not None:
                x = augment(x)
            optimizer.zero_grad()
            with autocast(precision, device):
                logits = module(x)
            F.cross_entropy(logits.float(), lookup[y]).backward()
            optimizer.step()
        scheduler.step()
        if on_epoch_end is not None:
            on_epoch_end(copy.deepcopy({
                "format": _TEACHER_PROGRESS, "epochs": epochs, "lrs": done_lrs,
                "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "random": rng_state(),
            }))
    if lrs is not None:
        lrs.extend(done_lrs)
    return GroupTeacher(module, classes, columns=range(len(classes)))


_TEACHER_PROGRESS = "avalanche_m2kd.teacher_progress/1"


_FINGERPRINT_WEIGHTS: Dict[tuple, Tensor] = {}


def input_fingerprints(x: Tensor) -> Tensor:
    """``[B, 2]`` int64 fingerprints of the rows of ``x``: two random linear
    hashes (mod 2^64) of each row's exact bit pattern. Equal rows give equal
    fingerprints whatever the batch; different rows collide with negligible
    probability."""
    flat = x.detach().reshape(x.shape[0], -1).contiguous()
    if flat.dtype in (torch.float32, torch.int32):
        bits = flat.view(torch.int32).to(torch.int64)
    elif flat.dtype in (torch.float64, torch.int64):
        bits = flat.view(torch.int64)
    elif flat.dtype in (torch.float16, torch.bfloat16, torch.int16):
        bits = flat.view(torch.int16).to(torch.int64)
    else:
        bits = flat.to(torch.int64)
    key = (bits.shape[1], str(bits.device))
    if key not in _FINGERPRINT_WEIGHTS:
        g = torch.Generator().manual_seed(0x5EED)
        w = torch.randint(1, 2**62, (bits.shape[1], 2), generator=g, dtype=torch.int64) | 1
        _FINGERPRINT_WEIGHTS[key] = w.to(bits.device)
    w = _FINGERPRINT_WEIGHTS[key]
    # integer arithmetic wraps modulo 2^64: exact and independent of batch composition
    return torch.stack([(bits * w[:, 0]).sum(dim=1), (bits * w[:, 1]).sum(dim=1)], dim=1)


class OutputCache:
    """Per-input storage of teacher outputs (one row per distinct input)."""

    def __init__(self, n_teachers: int):
        self.n_teachers = n_teachers
        self._n_rows = 0
        # Known inputs on the device: first fingerprints sorted (for searchsorted),
        # the row of each, and every row's second fingerprint (checked on a match).
        self._sorted_first: Optional[Tensor] = None
        self._sorted_rows: Optional[Tensor] = None
        self._second: Optional[Tensor] = None
        self._values: List[Optional[Tensor]] = [None] * n_teachers
        self._filled: List[Optional[Tensor]] = [None] * n_teachers
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self._n_rows

    def rows(self, x: Tensor) -> Tensor:
        """Row of each input of the batch (new inputs get new rows), looked up
        on the device; the only host read is whether the batch holds a new input."""
        fingerprints = input_fingerprints(x)
        first, second = fingerprints[:, 0].contiguous(), fingerprints[:, 1].contiguous()
        rows = torch.full_like(first, -1)
        if self._sorted_first is not None:
            at = torch.searchsorted(self._sorted_first, first).clamp(max=self._sorted_first.numel() - 1)
            candidate = self._sorted_rows[at]
            # both fingerprints must agree; a clash of the first alone is a new row (never a wrong one)
            known = (self._sorted_first[at] == first) & (self._second[candidate] == second)
            rows = torch.where(known, candidate, rows)
        new = rows < 0
        if bool(new.any()):
            distinct, inverse = torch.unique(fingerprints[new], dim=0, return_inverse=True)
            added = torch.arange(self._n_rows, self._n_rows + distinct.shape[0], device=x.device)
            rows[new] = added[inverse]
            self._n_rows += distinct.shape[0]
            firsts = distinct[:, 0] if self._sorted_first is None else torch.cat([self._sorted_first, distinct[:, 0]])
            all_rows = added if self._sorted_rows is None else torch.cat([self._sorted_rows, added])
            order = torch.argsort(firsts, stable=True)
            self._sorted_first, self._sorted_rows = firsts[order], all_rows[order]
            self._second = distinct[:, 1] if self._second is None else torch.cat([self._second, distinct[:, 1]])
        return rows

    def _ensure(self, j: int, width: int, device: torch.device) -> None:
        needed = max(self._n_rows, 1)
        values, filled = self._values[j], self._filled[j]
        if values is None:
            capacity = max(needed, 1024)
            self._values[j] = torch.empty(capacity, width, device=device)
            self._filled[j] = torch.zeros(capacity, dtype=torch.bool, device=device)
        elif values.shape[0] < needed:
            capacity = max(needed, 2 * values.shape[0])
            grown = torch.empty(capacity, values.shape[1], device=values.device)
            grown[: values.shape[0]] = values
            grown_filled = torch.zeros(capacity, dtype=torch.bool, device=values.device)
            grown_filled[: filled.shape[0]] = filled
            self._values[j], self._filled[j] = grown, grown_filled

    def missing(self, j: int, rows: Tensor) -> Tensor:
        """Mask of the rows teacher ``j`` has no output for yet."""
        filled = self._filled[j]
        if filled is None:
            return torch.ones_like(rows, dtype=torch.bool)
        inside = rows < filled.shape[0]
        out = torch.ones_like(rows, dtype=torch.bool)
        out[inside] = ~filled[rows[inside]]
        return out

    def store(self, j: int, rows: Tensor, values: Tensor) -> None:
        self._ensure(j, values.shape[1], values.device)
        self._values[j][rows] = values
        self._filled[j][rows] = True

    def gather(self, j: int, rows: Tensor) -> Tensor:
        return self._values[j].index_select(0, rows)

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._values if v is not None)

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


TeacherInference = Literal["fused", "plain", "compiled"]
"""How a :class:`TeacherSet` runs its teachers."""
TEACHER_INFERENCE = get_args(TeacherInference)


Routing = Literal["split", "masked"]
"""How :meth:`TeacherSet.run_routed` gives each sample its own teacher."""
ROUTINGS = get_args(Routing)


def check_routing(routing: str, caller: str) -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"{caller}: teacher_routing must be one of {', '.join(repr(r) for r in ROUTINGS)}, got {routing!r}")


def check_inference(inference: str, caller: str) -> None:
    if inference not in TEACHER_INFERENCE:
        choices = ", ".join(repr(c) for c in TEACHER_INFERENCE)
        raise ValueError(f"{caller}: teacher_inference must be one of {choices}, got {inference!r}")


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` in which every ``BatchNorm2d`` whose
    input is a ``Conv2d`` used once (and only by it) is folded into that
    convolution and replaced by ``nn.Identity``.

    Module names stay (feature taps and auxiliary heads still find their
    layers); the function is the same up to float rounding. A module whose
    forward ``torch.fx`` cannot trace is copied unchanged. Written here
    because torch's ``fx`` fusion returns a flattened ``GraphModule`` whose
    container modules no longer run, which would silence feature taps.
    """
    folded = freeze(copy.deepcopy(module))
    try:
        graph = fx.symbolic_trace(folded).graph
    except Exception:  # data-dependent control flow: run it as it is
        return folded
    named = dict(folded.named_modules())
    calls: Dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        bn = named.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or calls[node.target] != 1:
            continue
        source = node.args[0]
        conv = named.get(source.target) if isinstance(source, fx.Node) and source.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or calls[source.target] != 1 or len(source.users) != 1:
            continue
        folded.set_submodule(source.target, freeze(fuse_conv_bn_eval(conv, bn)))
        folded.set_submodule(node.target, nn.Identity())
    return folded


def inference_copy(module: nn.Module, inference: TeacherInference) -> nn.Module:
    """What a :class:`TeacherSet` runs for ``module``: the module itself
    (``"plain"``) or a BatchNorm-folded, channels-last copy (``"fused"``, and
    ``"compiled"``, which then compiles it)."""
    if inference == "plain":
        return module
    return fold_batchnorm(module).to(memory_format=torch.channels_last)


class _Forward(nn.Module):
    """A teacher's whole forward as one module (for ``functional_call``):
    logits, auxiliary logits and tapped features."""

    def __init__(self, module: nn.Module, feature_layers: Sequence[str], aux_logits: bool):
        super().__init__()
        self.model = module
        self.aux_logits = aux_logits
        self.taps = FeatureTaps(module, feature_layers) if feature_layers else None

    def forward(self, x: Tensor):
        if self.taps is None:
            return self.model(x), [], []
        with self.taps:
            out = self.model(x)
            features = self.taps.features()
        aux = getattr(self.model, AUX_ATTRIBUTE)(features) if self.aux_logits else []
        return out, aux, features


def _pad_to(states: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """Zero-pad same-named tensors to their largest shape (heads that grew)."""
    padded = []
    for state in states:
        out = {}
        for name, value in state.items():
            shape = [max(s[name].shape[d] for s in states) for d in range(value.dim())]
            if list(value.shape) == shape:
                out[name] = value
            else:
                grown = value.new_zeros(shape)
                grown[tuple(slice(0, s) for s in value.shape)] = value
                out[name] = grown
        padded.append(out)
    return padded


class _StackedTeachers:
    """All teachers in one ``vmap`` over their stacked weights."""

    def __init__(self, modules: Sequence[nn.Module], feature_layers: Sequence[str], aux_logits: bool):
        keys = [list(m.state_dict()) for m in modules]
        if any(k != keys[0] for k in keys):
            raise ValueError("batched teachers need the same architecture (the same state_dict names)")
        states = _pad_to([{k: v.detach() for k, v in m.state_dict().items()} for m in modules])
        template = copy.deepcopy(modules[0])
        load_state_reshaped(template, states[0])
        freeze(template)
        self.forward = _Forward(template, feature_layers, aux_logits)
        param_names = {f"model.{n}" for n, _ in template.named_parameters()}
        self.params = {}
        self.buffers = {}
        for name in states[0]:
            stacked = torch.stack([s[name] for s in states]).contiguous()  # vmap has no channels-last batching rules
            (self.params if f"model.{name}" in param_names else self.buffers)[f"model.{name}"] = stacked

    def to(self, device) -> "_StackedTeachers":
        self.forward.to(device)
        self.params = {k: v.to(device) for k, v in self.params.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def __call__(self, x: Tensor, indices: Optional[Sequence[int]] = None):
        params, buffers = self.params, self.buffers
        if indices is not None:
            idx = torch.as_tensor(list(indices), device=x.device)
            params = {k: v.index_select(0, idx) for k, v in params.items()}
            buffers = {k: v.index_select(0, idx) for k, v in buffers.items()}

        def one(p, b, inputs):
            out, aux, feats = functional_call(self.forward, (p, b), (inputs,))
            return out, tuple(aux), tuple(feats)

        return torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x)


COMPILED_TOLERANCE = 1e-3
"""Largest difference allowed between a compiled teacher's first outputs and the
uncompiled copy's, relative to the largest output (float rounding is far below)."""


class _CheckedCompiled:
    """A compiled teacher forward that proves itself on the first batch of each
    input shape (each shape compiles anew): its outputs must be finite and equal
    the uncompiled copy's to :data:`COMPILED_TOLERANCE`; otherwise it warns
    once and runs uncompiled from then on.
    Why: torch.compile can return wrong numbers on some CPU and kernel settings
    (seen: inductor under ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine gave
    NaN and 1e35 logits), and a teacher's outputs become the student's targets."""

    def __init__(self, forward: nn.Module):
        self.eager = forward
        self.compiled = torch.compile(forward)
        self.checked: set = set()  # input shapes whose compiled outputs were compared

    def to(self, device):
        self.eager.to(device)
        return self

    def __call__(self, x: Tensor):
        if self.compiled is self.eager or tuple(x.shape) in self.checked:
            return self.compiled(x)
        got, want = self.compiled(x), self.eager(x)
        pairs = list(zip(_flat(got), _flat(want)))
        bad = [i for i, (a, b) in enumerate(pairs)
               if not torch.isfinite(a).all() or (a - b).abs().max() > COMPILED_TOLERANCE * b.abs().max().clamp_min(1e-12)]
        self.checked.add(tuple(x.shape))
        if bad:
            warnings.warn(
                "teacher_inference='compiled': torch.compile's teacher outputs differ from the uncompiled teacher's "
                "on this machine; the teachers run uncompiled (use teacher_inference='fused' to skip the compilation)",
                RuntimeWarning,
            )
            self.compiled = self.eager
            return want
        return got


def _flat(outputs) -> List[Tensor]:
    out, aux, feats = outputs
    return [out, *aux, *feats]


def _run(forward: Callable, x: Tensor):
    """One teacher's forward; a compiler failure (``inference="compiled"``) names the fix."""
    try:
        return forward(x)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # e.g. no C++ compiler on this machine
        raise RuntimeError(
            f"teacher_inference='compiled': torch.compile could not compile the teachers ({error}); "
            "install a C++ compiler (CPU) or Triton (GPU), or use teacher_inference='fused'"
        ) from error


class TeacherSet:
    """Runs a list of :class:`GroupTeacher` under ``no_grad``.

    Args:
        teachers: the teachers, one per class group (groups must be disjoint).
        feature_layers: module names tapped in every teacher (M2KD's
            ``aux_layers``); their outputs come back as ``features``.
        aux_logits: also return the teachers' auxiliary-head logits (teachers
            must then carry M2KD's auxiliary heads).
        batched: evaluate all teachers in one ``vmap`` pass (same architecture).
        cache: keep each teacher's outputs per input (see the module
            docstring); incompatible with returning ``features``.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: the teachers'
            forward passes run under ``torch.autocast`` in that precision; their
            outputs are returned (and cached) in float32.
        inference: ``"fused"`` (default [ours]: BatchNorm folded into the
            convolutions, channels-last images; outputs equal to float
            rounding, about 1.2x faster inside M2KD on this project's CPU),
            ``"plain"`` (the modules as given, bit for bit) or ``"compiled"``
            (the fused copies through ``torch.compile``: faster again once
            compiled, see the README's speed table, but the first batch waits
            for the compiler, tens of seconds, and it needs a C++ compiler on
            a CPU; not the default for that reason). The teachers' own modules
            are never changed: ``"fused"`` and ``"compiled"`` run copies.
            ``"compiled"`` does not combine with ``batched``.
    """

    def __init__(
        self,
        teachers: Sequence[GroupTeacher],
        feature_layers: Sequence[str] = (),
        aux_logits: bool = False,
        batched: bool = False,
        cache: bool = False,
        precision: Precision = "fp32",
        inference: TeacherInference = "fused",
    ):
        check_precision(precision, "TeacherSet")
        check_inference(inference, "TeacherSet")
        self.precision = precision
        self.inference = inference
        self.teachers = list(teachers)
        self.feature_layers = list(feature_layers)
        self.aux_logits = aux_logits
        # tapped feature maps are returned only when they are not just inputs to auxiliary heads
        self.return_features = bool(self.feature_layers) and not aux_logits
        seen: set[int] = set()
        for t in self.teachers:
            overlap = seen.intersection(t.classes)
            if overlap:
                raise ValueError(f"TeacherSet: class groups overlap on classes {sorted(overlap)}")
            seen.update(t.classes)
        if aux_logits and not feature_layers:
            raise ValueError("TeacherSet: aux_logits needs feature_layers")
        if cache and self.return_features:
            raise ValueError("TeacherSet: feature maps are not cached (too large); use cache=False")
        if batched and inference == "compiled":
            raise ValueError("TeacherSet: batched teachers (vmap) are not compiled; use inference='fused' with batched=True")
        running = [inference_copy(t.module, inference) for t in self.teachers]
        self._runners = [_Forward(m, self.feature_layers, aux_logits) for m in running]
        if inference == "compiled":
            # every teacher shares one compiled graph when their shapes agree (weights are graph inputs)
            self._runners = [_CheckedCompiled(r) for r in self._runners]
        self.batched = batched and len(self.teachers) > 1
        self._stacked = _StackedTeachers(running, self.feature_layers, aux_logits) if self.batched else None
        self.cache = OutputCache(len(self.teachers)) if cache else None
        self._class_to_teacher: Optional[Tensor] = None

    def __len__(self) -> int:
        return len(self.teachers)

    @property
    def groups(self) -> List[List[int]]:
        return [t.classes for t in self.teachers]

    def to(self, device: torch.device | str) -> "TeacherSet":
        for t, runner in zip(self.teachers, self._runners):
            t.module.to(device)
            runner.to(device)
        if self._stacked is not None:
            self._stacked.to(device)
        return self

    # -- computing outputs ------------------------------------------------------------
    def _select(self, j: int, out: Tensor, aux: Sequence[Tensor], feats: Sequence[Tensor]) -> TeacherOutput:
        columns = self.teachers[j].column_index(out.device)
        return TeacherOutput(
            out.index_select(1, columns).float(),
            [a.index_select(1, columns).float() for a in aux],
            [f.float() for f in feats] if self.return_features else [],
        )

    @torch.no_grad()
    def compute(self, x: Tensor, indices: Sequence[int]) -> Dict[int, TeacherOutput]:
        """Teachers ``indices`` on ``x``, without the cache."""
        indices = list(indices)
        with autocast(self.precision, x.device):
            if self._stacked is not None and len(indices) > 1:
                out, aux, feats = self._stacked(x, None if indices == list(range(len(self))) else indices)
                return {
                    j: self._select(j, out[i], [a[i] for a in aux], [f[i] for f in feats]) for i, j in enumerate(indices)
                }
            if self.inference != "plain" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return {j: self._select(j, *_run(self._runners[j], x)) for j in indices}

    def run(self, index: int, x: Tensor) -> TeacherOutput:
        """Teacher ``index`` on ``x``."""
        return self.run_all(x, [index])[0]

    @torch.no_grad()
    def run_all(self, x: Tensor, indices: Optional[Sequence[int]] = None) -> List[TeacherOutput]:
        """Teachers ``indices`` (default: all) on the whole batch (M2KD), in that order."""
        indices = list(range(len(self))) if indices is None else list(indices)
        if self.cache is None:
            outputs = self.compute(x, indices)
        else:
            outputs = self._through_cache(x, self.cache.rows(x), sorted(set(indices)))
        return [outputs[j] for j in indices]

    def _through_cache(self, x: Tensor, rows: Tensor, indices: List[int]) -> Dict[int, TeacherOutput]:
        """Teachers ``indices`` on ``x`` (cache rows ``rows``): a forward pass
        only for the inputs some of them have no stored output for."""
        need = torch.zeros_like(rows, dtype=torch.bool)
        for j in indices:
            need |= self.cache.missing(j, rows)
        n_need = int(need.sum())
        self.cache.misses += n_need
        self.cache.hits += rows.numel() - n_need
        if n_need:
            where = torch.nonzero(need).flatten()
            for j, out in self.compute(x.index_select(0, where), indices).items():
                self.cache.store(j, rows[where], self._pack(out))
        return {j: self._unpack(self.cache.gather(j, rows), len(self.teachers[j].classes)) for j in indices}

    def _pack(self, out: TeacherOutput) -> Tensor:
        return torch.cat([out.logits, *out.aux_logits], dim=1)

    def _unpack(self, values: Tensor, width: int) -> TeacherOutput:
        parts = list(values.split(width, dim=1))
        return TeacherOutput(parts[0], parts[1:])

    # -- routing (ED) -------------------------------------------------------------------
    def _owners(self, targets: Tensor) -> Tensor:
        """Per sample, the index of the teacher owning its label; ``len(self)``
        for a label no teacher owns (on the device, no read)."""
        device = targets.device
        if self._class_to_teacher is None or self._class_to_teacher.device != device:
            size = max(max(t.classes) for t in self.teachers) + 1
            table = torch.full((size,), -1, dtype=torch.long)
            for i, t in enumerate(self.teachers):
                table[t.classes] = i
            self._class_to_teacher = table.to(device)
        table = self._class_to_teacher
        inside = (targets >= 0) & (targets < table.numel())
        owner = torch.where(inside, table[targets.clamp(0, table.numel() - 1)], -1)
        return torch.where(owner < 0, len(self), owner)

    def route(self, targets: Tensor) -> List[Tensor]:
        """Batch positions of the samples each teacher owns (by label).

        Raises ``ValueError`` for a label no teacher owns.
        """
        k = len(self)
        owner = self._owners(targets)
        # one host read per batch: how many samples each teacher owns
        sizes = torch.bincount(owner, minlength=k + 1).tolist()
        if sizes[k]:
            owned = sorted(c for t in self.teachers for c in t.classes)
            bad = sorted({int(y) for y, o in zip(targets.tolist(), owner.tolist()) if o == k})
            raise ValueError(f"labels {bad} belong to no teacher's classes {owned}")
        positions = torch.argsort(owner, stable=True)  # ascending batch positions within each teacher
        return list(positions.split(sizes[:k]))

    def route_masks(self, targets: Tensor) -> List[Tensor]:
        """Per teacher, a ``[B]`` boolean mask of the samples it owns. Nothing
        is read from the device; a label no teacher owns fails a device-side
        assertion (on a GPU it surfaces at the next synchronisation)."""
        owner = self._owners(targets)
        torch._assert_async((owner < len(self)).all(), "a label belongs to no teacher's classes")
        return [owner == j for j in range(len(self))]

    @torch.no_grad()
    def run_routed(
        self, x: Tensor, targets: Tensor, routing: Routing = "split"
    ) -> tuple[List[Tensor], List[TeacherOutput]]:
        """Each sample through the teacher of its own group (ED).

        ``routing="split"`` (default) runs each teacher on its own samples
        only and returns their batch positions (teachers that own no sample of
        the batch give zero rows); finding the split reads one count per teacher
        from the device. ``routing="masked"`` runs every teacher on the whole
        batch and returns boolean masks: no read, at the price of each
        teacher's forward pass on all ``B`` samples.
        """
        check_routing(routing, "TeacherSet.run_routed")
        if routing == "masked":
            masks = self.route_masks(targets)
            return masks, self.run_all(x)
        index = self.route(targets)
        rows = self.cache.rows(x) if self.cache is not None else None
        outputs = []
        for j, idx in enumerate(index):
            n = len(self.teachers[j].classes)
            if idx.numel() == 0:
                outputs.append(TeacherOutput(x.new_zeros((0, n))))
                continue
            own = x.index_select(0, idx)
            if rows is None:
                outputs.append(self.compute(own, [j])[j])
            else:
                outputs.append(self._through_cache(own, rows[idx], [j])[j])
        return index, outputs


__all__ = [
    "GroupTeacher",
    "OutputCache",
    "TeacherOutput",
    "TeacherSet",
    "draw_teachers",
    "fold_batchnorm",
    "group_teachers",
    "input_fingerprints",
    "train_group_teacher",
]
