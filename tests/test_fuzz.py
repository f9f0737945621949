"""Bad input fuzzed at the public API: only ``TDAError`` (a ValueError) naming the argument, never an
opaque error from deep inside torch, numpy or sqlite."""

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tda_explorer import Attribution, AttributionDataset, AttributionTask, TDAError, get_method
from tda_explorer.evaluate import lds, mislabel_auc, recall_at
from tda_explorer.flags import FlagStore

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NUMBERS = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                    st.text(max_size=3), st.booleans())


def _ok_or_tda(fn, *names):
    """Run ``fn``; a failure must be TDAError mentioning one of ``names``."""
    try:
        return fn()
    except TDAError as err:
        assert any(n in str(err) for n in names), f"{err!r} names none of {names}"
        return None


@FUZZ
@given(n=st.integers(0, 6), m=st.integers(0, 6), dim=st.integers(1, 3),
       label_kind=st.sampled_from(["int", "float", "2d", "negative"]),
       ids=st.one_of(st.none(), st.lists(st.one_of(st.integers(0, 3), st.text(max_size=2)), max_size=7)))
def test_dataset_construction(n, m, dim, label_kind, ids):
    inputs = torch.randn(n, dim)
    labels = {"int": torch.zeros(m, dtype=torch.long), "float": torch.zeros(m),
              "2d": torch.zeros(m, 2, dtype=torch.long), "negative": -torch.ones(m, dtype=torch.long)}[label_kind]
    _ok_or_tda(lambda: AttributionDataset(inputs, labels, ids=ids), "inputs", "labels", "ids", "empty")


@FUZZ
@given(k=NUMBERS, kind=st.sampled_from(["proponents", "opponents", "both", ""]),
       test_id=st.one_of(st.integers(-2, 4), st.text(max_size=2)))
def test_topk_arguments(k, kind, test_id):
    att = Attribution(torch.randn(3, 5), ["a", "b", "c"], list(range(5)), "m")
    _ok_or_tda(lambda: att.topk(test_id, k, kind), "k", "kind", "test_id")


@FUZZ
@given(method=st.sampled_from(["grad-dot", "grad-cos", "tracin", "trak", "suspicion", "if-explicit", "if-cg",
                                     "if-ekfac", "if-lissa", "if-arnoldi", "if-datainf", "nope"]),
       projection_dim=NUMBERS, damping=NUMBERS, max_memory=NUMBERS,
       device=st.sampled_from(["cpu", "cuda:7", "tpu", "", None]))
def test_method_options(method, projection_dim, damping, max_memory, device):
    model = torch.nn.Linear(3, 2)
    task = AttributionTask(model)
    options = {"projection_dim": projection_dim, "max_memory": max_memory, "device": device}
    if method in ("trak", "if-explicit", "if-cg", "if-ekfac", "if-lissa", "if-arnoldi", "if-datainf"):
        options["damping"] = damping
    train = AttributionDataset(torch.randn(6, 3), torch.tensor([0, 1] * 3))
    names = ("projection_dim", "damping", "max_memory", "device", "method", "checkpoints", "out-of-fold",
             "positive definite", "diverged")

    def run():
        get_method(method, task, **options).fit(train).attribute(train)

    _ok_or_tda(run, *names)


@FUZZ
@given(bad=st.sampled_from([math.nan, math.inf, -math.inf]), row=st.integers(0, 5),
       method=st.sampled_from(["grad-dot", "trak", "tracin"]))
def test_non_finite_inputs_name_the_examples(bad, row, method):
    model = torch.nn.Linear(3, 2)
    task = AttributionTask(model, checkpoints=[])
    x = torch.randn(6, 3)
    x[row, 1] = bad
    train = AttributionDataset(x, torch.tensor([0, 1] * 3), ids=[f"ex{i}" for i in range(6)])
    options = {"checkpoints": [model.state_dict()], "learning_rates": [0.1]} if method == "tracin" else {}
    try:
        get_method(method, task, **options).fit(train)
    except TDAError as err:
        assert f"ex{row}" in str(err)
    else:
        raise AssertionError("non-finite inputs were accepted")


@FUZZ
@given(n_test=st.integers(0, 3), n_train=st.integers(0, 4), n_models=st.integers(0, 3), fraction=NUMBERS)
def test_metrics_shapes(n_test, n_train, n_models, fraction):
    scores = torch.randn(n_test, n_train)
    masks = torch.rand(n_models, n_train) < 0.5
    _ok_or_tda(lambda: lds(scores, masks, torch.randn(n_models, n_test)), "lds", "scores", "masks")
    flipped = torch.rand(n_train) < 0.5
    _ok_or_tda(lambda: mislabel_auc(torch.randn(n_train), flipped), "flipped", "suspicion")
    _ok_or_tda(lambda: recall_at(torch.randn(n_train), flipped, fraction), "fraction", "flipped", "suspicion")


@FUZZ
@given(train_id=st.one_of(NUMBERS, st.lists(st.integers(), max_size=2)), label=NUMBERS)
def test_flag_store_arguments(tmp_path_factory, train_id, label):
    store = FlagStore(tmp_path_factory.mktemp("flags") / "f.sqlite")
    _ok_or_tda(lambda: store.flag(train_id), "train_id")
    _ok_or_tda(lambda: store.relabel(train_id, label), "train_id", "label")
    store.close()


@FUZZ
@given(features=st.integers(1, 6), dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
       method=st.sampled_from(["grad-dot", "trak"]))
def test_inputs_that_do_not_fit_the_model(features, dtype, method):
    model = torch.nn.Linear(3, 2)
    train = AttributionDataset((torch.rand(4, features) * 3).to(dtype), torch.tensor([0, 1, 0, 1]))
    _ok_or_tda(lambda: get_method(method, AttributionTask(model)).fit(train), "train")
