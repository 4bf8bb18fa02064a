"""Paired runs: every strategy of the runner, at one seed, trains on the same
batches (sample indices and augmentation), whatever else it draws."""

import hashlib

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import EvaluationPlugin

from avalanche_m2kd import M2KDPlugin, PairedStreamPlugin, datasets
from avalanche_m2kd._cache import transform_is_deterministic
from benchmarks.strategies import ABLATIONS, NEEDS_MEMORY, STRATEGIES, Setup, build_strategy
from helpers import quiet_evaluator, synthetic_stream



def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().cpu().float().contiguous().numpy().tobytes()).hexdigest()[:16]


class BatchRecorder(SupervisedPlugin):
    """Per experience: each training batch's inputs (after augmentation) and
    the global generator's state before it, in the experience's epochs (not
    in a method's extra passes after them, such as PackNet's fine-tuning)."""

    def __init__(self):
        super().__init__()
        self.inputs, self.states, self.sizes, self.active = [], [], [], False

    def before_training_exp(self, strategy, **kwargs):
        self.inputs.append([])
        self.states.append([])
        self.sizes.append(len(strategy.adapted_dataset))

    def before_training_epoch(self, strategy, **kwargs):
        self.active = True

    def after_training_epoch(self, strategy, **kwargs):
        self.active = False

    def before_training_iteration(self, strategy, **kwargs):
        if self.active:
            self.states[-1].append(_digest(torch.random.get_rng_state()))

    def after_forward(self, strategy, **kwargs):  # mb_x as the model saw it (device data augments in before_forward)
        if self.active:
            self.inputs[-1].append(_digest(strategy.mb_x))


def _config(mem_size: int, store=None) -> dict:
    return {
        "dataset": "digits", "n_experiences": 3, "class_order": "natural", "model": "digits_cnn", "epochs": 2,
        "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "milestones": [1],
        "gamma": 0.5, "mem_size": mem_size, "augment": True, "precision": "fp32", "lr_sigmoid": 0.5, "m2kd_store": store,
    }


def _digits(augment: bool):
    data = datasets.subsample(datasets.load_dataset("digits"), 12, 4)
    train_t, eval_t = datasets.make_transforms(data, augment=augment)
    return data, datasets.make_benchmark(data, 3, datasets.class_order("natural", np.unique(data.y_train)), train_t, eval_t)


@pytest.fixture(scope="module")
def digits():
    return _digits(augment=True)


def _record(name: str, config: dict, digits, last_plugins=()) -> BatchRecorder:
    from avalanche.training.determinism.rng_manager import RNGManager

    data, benchmark = digits
    RNGManager.set_random_seeds(0)
    recorder = BatchRecorder()
    setup = Setup(config, data.n_classes, data.input_shape, "cpu", EvaluationPlugin(loggers=[]), None, (),
                  (recorder, *last_plugins), seed=0)
    strategy = build_strategy(name, setup)
    for exp in benchmark.train_stream:
        strategy.train(exp, num_workers=0)
    return recorder


def _same_batches(records: dict, what: str, experiences=range(3)) -> None:
    reference_name, reference = next(iter(records.items()))
    for name, rec in records.items():
        for e in experiences:
            assert getattr(rec, what)[e] == getattr(reference, what)[e], f"{name} and {reference_name} differ in experience {e + 1}"


WITHOUT_MEMORY = [n for n in STRATEGIES if n not in NEEDS_MEMORY and n != "joint"]


def test_every_strategy_without_memory_trains_on_the_same_batches(digits):
    """Issue 24: M2KD's cache check and every side draw used to move the data
    stream from experience 2 on. Through experience 3, every strategy without
    memory sees the same augmented inputs in the same order, the packnet store
    (whose fine-tuning trains extra epochs) included."""
    records = {n: _record(n, _config(0), digits) for n in WITHOUT_MEMORY}
    records["m2kd (packnet)"] = _record("m2kd", _config(0, "packnet"), digits)
    records["m2kd-bce (sparse)"] = _record("m2kd-bce", _config(0, "sparse"), digits)
    assert len(records["naive"].inputs[2]) > 2
    _same_batches(records, "inputs")
    _same_batches(records, "states")


def test_every_strategy_with_a_memory_draws_the_same_random_numbers(digits):
    """With a memory, herding picks other exemplars per method, so the inputs
    differ from experience 2 on; the sample order and augmentation (the
    generator's state before every batch) do not, and experience 1 is identical."""
    names = [n for n in STRATEGIES if n not in ABLATIONS and n != "joint"]
    records = {n: _record(n, _config(20), digits) for n in names}
    _same_batches(records, "inputs", experiences=[0])
    # Avalanche's ICaRL keeps ceil(memory / classes seen) exemplars per class (and
    # more on a class-poor memory): its training sets are larger, so only its
    # first experience can pair; every other strategy holds exactly mem_size.
    icarl = records.pop("icarl")
    assert icarl.sizes[1:] != records["naive"].sizes[1:]
    assert all(r.sizes == records["naive"].sizes for r in records.values())
    _same_batches(records, "states")


def test_device_data_keeps_runs_paired():
    """The same with the training set held on the device and augmented there
    (the device data plugin draws from the device's generator; the datasets'
    own transforms do not augment, as with the runner's --device-data)."""
    from avalanche_m2kd import DeviceDataPlugin

    plain = _digits(augment=False)
    records = {n: _record(n, _config(0), plain, (DeviceDataPlugin(augment=True, padding=4),))
               for n in ("naive", "lwf", "m2kd", "m2kd-bce-last", "ed")}
    _same_batches(records, "inputs")


def test_the_cache_check_leaves_every_global_generator_where_it_was(digits):
    import random

    _, benchmark = digits
    dataset = benchmark.train_stream[0].dataset
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    before = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert transform_is_deterministic(dataset) is False  # random crop and flip: it did draw
    after = (torch.random.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]


def test_sampled_teachers_draw_from_their_own_generator():
    """teachers_per_batch samples snapshots on a generator of its own: the
    global stream after an experience is the one the same plugin without
    sampling leaves."""
    from avalanche.training import Naive

    from avalanche_m2kd.models import digits_cnn

    def run(k):
        torch.manual_seed(0)
        model = digits_cnn()
        plugin = M2KDPlugin(teachers_per_batch=k, teacher_cache="off")
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=8,
                         train_epochs=1, evaluator=quiet_evaluator(), plugins=[plugin])
        states = []
        for exp in synthetic_stream(n_experiences=3, shape=(1, 8, 8)).train_stream:
            strategy.train(exp, num_workers=0)
            states.append(torch.random.get_rng_state())
        return states

    sampled, full = run(1), run(None)
    assert all(torch.equal(a, b) for a, b in zip(sampled, full))


def test_epoch_seeds_depend_on_seed_experience_and_epoch_only():
    from avalanche_m2kd._random import epoch_seed

    seeds = {epoch_seed(s, e, p) for s in range(3) for e in range(4) for p in range(5)}
    assert len(seeds) == 60 and epoch_seed(1, 2, 3) == epoch_seed(1, 2, 3)
    with pytest.raises(ValueError, match="seed must be an int"):
        PairedStreamPlugin("0")


def _initial_weights(name: str, config: dict, n_classes: int, input_shape: tuple) -> list:
    from avalanche.training.determinism.rng_manager import RNGManager

    RNGManager.set_random_seeds(0)
    strategy = build_strategy(name, Setup(config, n_classes, input_shape, "cpu", EvaluationPlugin(loggers=[])))
    return [_digest(p) for p in strategy.model.parameters()]


@pytest.mark.parametrize("model, n_classes, input_shape", [("digits_cnn", 10, (1, 8, 8)),
                                                           ("resnet32_icarl", 100, (3, 32, 32))])
def test_icarl_starts_from_the_weights_of_the_m2kd_icarl_forms(model, n_classes, input_shape):
    """Avalanche's ICaRL takes a feature extractor and a classifier; the runner
    cuts them from the fixed-head model the M2KD iCaRL forms build, so that on
    one seed the paired runs also share their initial weights (they used to
    differ from the first convolution on: the heads drew different amounts)."""
    config = dict(_config(20), model=model)
    icarl = _initial_weights("icarl", config, n_classes, input_shape)
    for name in ("m2kd-icarl", "m2kd-icarl-last", "m2kd-icarl-noaux", "m2kd-icarl-last-noaux"):
        assert _initial_weights(name, config, n_classes, input_shape) == icarl, name
    # and the growing-head family shares its own: LwF, naive and M2KD's exemplar-free forms
    lwf = _initial_weights("lwf", config, n_classes, input_shape)
    for name in ("naive", "m2kd-bce", "m2kd-bce-last", "m2kd"):
        assert _initial_weights(name, config, n_classes, input_shape) == lwf, name
