"""Library misuse gets one clear error naming the problem and the fix (issue 26.6)."""

import math

import pytest
import torch
from avalanche.training import Naive
from torch import nn

from avalanche_m2kd import EducationDistillationPlugin, M2KDLoss, M2KDPlugin, RoutedDistillationPlugin
from avalanche_m2kd.models import digits_cnn
from helpers import quiet_evaluator, synthetic_stream


@pytest.mark.parametrize("make, message", [
    (lambda: M2KDPlugin(temperature=math.nan), "temperature must be a finite number > 0, got nan"),
    (lambda: M2KDPlugin(temperature=math.inf), "temperature must be a finite number > 0, got inf"),
    (lambda: M2KDPlugin(mm_weight=math.nan), "mm_weight must be a finite number >= 0, got nan"),
    (lambda: M2KDLoss(aux_weight=-1.0), "aux_weight must be a finite number >= 0"),
    (lambda: EducationDistillationPlugin(teacher_factory=digits_cnn, temperature=math.nan), "temperature must be a finite number > 0"),
    (lambda: EducationDistillationPlugin(teacher_factory=digits_cnn, alpha=math.nan), "alpha must be in [0, 1], got nan"),
    (lambda: RoutedDistillationPlugin([(digits_cnn(2), [0, 1])], temperature=math.nan), "temperature must be a finite number > 0"),
])
def test_nan_and_infinite_hyperparameters_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make()


def _train(model, plugins):
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01), train_mb_size=8, train_epochs=1,
                     evaluator=quiet_evaluator(), plugins=plugins)
    strategy.train(synthetic_stream(n_experiences=2, shape=(1, 8, 8)).train_stream[0], num_workers=0)


def test_a_plugin_listed_twice_is_refused():
    plugin = M2KDPlugin()
    with pytest.raises(ValueError, match="this plugin instance is listed twice"):
        _train(digits_cnn(), [plugin, plugin])


def test_aux_layers_naming_the_head_are_refused():
    with pytest.raises(ValueError, match=r"aux_layers \['head'\] name the classifier head"):
        _train(digits_cnn(), [M2KDPlugin(aux_layers=("stage1", "head"))])


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = digits_cnn()

    def forward(self, x):
        return self.net(x), x.mean()


def test_a_model_returning_a_tuple_is_refused():
    with pytest.raises(ValueError, match="the model returns a tuple, not a tensor of logits"):
        _train(TupleModel(), [M2KDPlugin()])


def test_a_criterion_with_the_sigmoid_form_is_refused_not_replaced():
    from avalanche_m2kd import M2KD

    model = digits_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="the sigmoid loss is the criterion"):
        M2KD(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), loss="bce")
    assert M2KD(model=model, optimizer=optimizer, loss="bce").m2kd.loss == "bce"
    assert isinstance(M2KD(model=model, optimizer=optimizer)._criterion, nn.CrossEntropyLoss)
