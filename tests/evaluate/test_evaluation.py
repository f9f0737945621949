"""Suspicion, the evaluation harness, LOO ground truth and brittleness."""

import numpy as np
import pytest
import torch

from tda_explorer import AttributionTask, TDAError, get_method
from tda_explorer.compute.training.train import out_of_fold_probabilities
from tda_explorer.evaluate import compare_methods, mislabel_auc
from tda_explorer.retraining import brittleness, loo_correlation, loo_ground_truth, subset_ground_truth


def test_out_of_fold_probabilities_never_see_their_example(digits_experiment):
    train = digits_experiment.split.train
    probs = out_of_fold_probabilities(digits_experiment.factory, train.inputs, train.labels,
                                      digits_experiment.config, folds=3)
    assert probs.shape == (len(train), 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(train)))
    flipped = digits_experiment.split.flipped
    # held-out models disagree with flipped labels far more than the trained model does
    p_given = probs[torch.arange(len(train)), train.labels]
    assert p_given[flipped].mean() < 0.2 < p_given[~flipped].mean()
    with pytest.raises(TDAError, match="folds must be between 2"):
        out_of_fold_probabilities(digits_experiment.factory, train.inputs, train.labels, digits_experiment.config,
                                  folds=1)


def test_suspicion_combines_signals_and_validates(digits_experiment):
    exp = digits_experiment
    train, flipped = exp.split.train, exp.split.flipped
    task = exp.task()
    probs = torch.full((len(train), 10), 0.1)
    method = get_method("suspicion", task, oof_probabilities=probs, signal="self-influence").fit(train)
    tracin = get_method("tracin", task).fit(train)
    # with uninformative out-of-fold probabilities the ranking is TracIn's
    torch.testing.assert_close(method.self_influence().double(), tracin.self_influence().double().log() - np.log(0.1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.attribute(exp.split.test).scores, tracin.attribute(exp.split.test).scores)
    # the default signal: the model's own −log p(given label), from its softmax, plus −log p_oof
    default = get_method("suspicion", task, oof_probabilities=probs).fit(train)
    with torch.no_grad():
        p_model = exp.record.model(train.inputs).double().softmax(-1)[torch.arange(len(train)), train.labels]
    torch.testing.assert_close(default.self_influence().double(), -p_model.log() - np.log(0.1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default.attribute(exp.split.test).scores, tracin.attribute(exp.split.test).scores)
    real = get_method("suspicion", task, model_factory=exp.factory, train_config=exp.config, repeats=1).fit(train)
    assert mislabel_auc(real.self_influence(), flipped) >= mislabel_auc(tracin.self_influence(), flipped) - 0.01
    with pytest.raises(TDAError, match="signal"):
        get_method("suspicion", task, oof_probabilities=probs, signal="margin")
    with pytest.raises(TDAError, match="needs out-of-fold probabilities"):
        get_method("suspicion", task)
    with pytest.raises(TDAError, match=r"oof_probabilities must be \[n_train, n_classes\]"):
        get_method("suspicion", task, oof_probabilities=torch.ones(3, 10)).fit(train)
    # the base method's options travel in base_options; the shared ones given to suspicion are passed on
    on_trak = get_method("suspicion", task, oof_probabilities=probs, base="trak", base_options={"projection_dim": 64},
                         max_memory=10**6)
    assert on_trak.base.name == "trak" and on_trak.base.args.projection_dim == 64
    assert on_trak.base.args.max_memory == 10**6 and on_trak.config()["base_options"] == {"projection_dim": 64}
    with pytest.raises(TDAError, match="base must be one of .*'tracin'.*, got 'suspicion'"):
        get_method("suspicion", task, oof_probabilities=probs, base="suspicion")
    with pytest.raises(TDAError, match="tracin has no option 'damping'"):
        get_method("suspicion", task, oof_probabilities=probs, base_options={"damping": 0.1})
    with pytest.raises(TDAError, match="suspicion has no option 'damping'"):
        get_method("suspicion", task, oof_probabilities=probs, damping=0.1)


def test_compare_methods_is_tidy(digits_experiment, tmp_path):
    truth = subset_ground_truth(digits_experiment, n_subsets=10, cache_dir=tmp_path)
    df = compare_methods(digits_experiment, ["grad-dot", ("trak", {"projection_dim": 256})], truth)
    assert df.method.tolist() == ["grad-dot", "trak"]
    assert df.options.tolist() == ["", "projection_dim=256"]
    assert df.lds.between(-1, 1).all() and (df.mislabel_auc > 0.8).all()


def test_trak_ensemble_of_independent_models_through_harness(digits_experiment):
    from tda_explorer.evaluate import run_method

    attributor, _, _, info = run_method(digits_experiment, "trak", ensemble=3, projection_dim=128)
    assert len(attributor.members) == 3 and info["extra_training_seconds"] > 0
    a, b = attributor.members[0]["0.weight"], attributor.members[1]["0.weight"]
    assert not torch.equal(a, b)


def test_loo_ground_truth_and_correlation_on_convex_model():
    from tda_explorer.experiments import build_experiment

    exp = build_experiment("lr", n_train=80, n_test=15, epochs=150)
    truth = loo_ground_truth(exp, positions=range(0, 80, 4))
    assert truth.delta.shape == (20, 15)
    # the exact influence function is what leave-one-out is the truth for on a convex model (TRAK's default damping,
    # chosen across the zoo for LDS, is 0.40 here)
    attribution = get_method("if-explicit", exp.task()).fit(exp.split.train).attribute(exp.split.test)
    assert loo_correlation(attribution, truth) > 0.8
    shuffled = attribution.scores[:, torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    from tda_explorer import Attribution

    noise = Attribution(shuffled, attribution.test_ids, attribution.train_ids, "shuffled")
    assert loo_correlation(noise, truth) < 0.3
    with pytest.raises(TDAError, match="outside the training set"):
        loo_ground_truth(exp, positions=[500])


def test_brittleness_removing_proponents_flips_before_random(digits_experiment):
    exp = digits_experiment
    attribution = get_method("tracin", exp.task()).fit(exp.split.train).attribute(exp.split.test)
    test_ids = exp.split.test.ids[:6]
    df = brittleness(exp, attribution, test_ids, ks=(10, 40, 120))
    assert list(df.columns) == ["test_id", "method", "k_flip"]
    assert df.k_flip.notna().sum() >= 3  # removing the strongest proponents flips most predictions
    random_scores = torch.randn_like(attribution.scores)
    from tda_explorer import Attribution

    rand = Attribution(random_scores, attribution.test_ids, attribution.train_ids, "random")
    df_rand = brittleness(exp, rand, test_ids, ks=(10, 40, 120))
    assert df_rand.k_flip.notna().sum() <= df.k_flip.notna().sum()


def test_task_weight_decay_reaches_trak_damping(digits_experiment):
    task = AttributionTask(digits_experiment.record.model, weight_decay=0.0)
    with pytest.raises(TDAError, match=r"damping must be a number in \[0, inf\), got -1.0"):
        get_method("trak", task, damping=-1.0)
