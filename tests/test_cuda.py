"""CUDA paths give the CPU's numbers (skipped without a GPU; run on the device machine)."""

import pytest
import torch

from tda_explorer import get_method
from tda_explorer.cli import benchmark_module
from tda_explorer.evaluate import lds
from tda_explorer.experiments import build_experiment
from tda_explorer.retraining import subset_ground_truth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture(scope="module")
def experiments():
    cpu = build_experiment("mlp", noise=0.1, n_train=300, n_test=50, epochs=10)
    gpu = build_experiment("mlp", noise=0.1, n_train=300, n_test=50, epochs=10, device="cuda")
    return cpu, gpu


def test_training_on_cuda_matches_cpu(experiments):
    cpu, gpu = experiments
    for name, value in cpu.record.model.state_dict().items():
        torch.testing.assert_close(gpu.record.model.state_dict()[name].cpu(), value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method,options", [("grad-dot", {}), ("grad-cos", {}), ("tracin", {}), ("trak", {}),
                                            ("trak", {"projection_dim": 512}), ("grad-dot", {"projection_dim": 256}),
                                            ("if-explicit", {}), ("if-explicit", {"projection_dim": 256}),
                                            ("if-cg", {}), ("if-lissa", {"depth": 200}), ("if-arnoldi", {}),
                                            ("if-kfac", {}), ("if-ekfac", {}), ("if-astra", {}), ("if-datainf", {})])
def test_methods_on_cuda_match_cpu(experiments, method, options):
    cpu, _ = experiments
    on_cpu = get_method(method, cpu.task(), **options).fit(cpu.split.train)
    on_gpu = get_method(method, cpu.task(), device="cuda", **options).fit(cpu.split.train)
    a, b = on_cpu.attribute(cpu.split.test).scores, on_gpu.attribute(cpu.split.test).scores
    assert b.device.type == "cpu"  # results come back to the CPU
    scale = a.abs().max()
    assert ((a - b).abs().max() / scale) < 1e-3
    si_a, si_b = on_cpu.self_influence(), on_gpu.self_influence()
    assert ((si_a - si_b).abs().max() / si_a.abs().max()) < 1e-3


def test_suspicion_and_ground_truth_on_cuda(experiments, tmp_path):
    _, gpu = experiments
    method = get_method("suspicion", gpu.task(), device="cuda", model_factory=gpu.factory, train_config=gpu.config,
                        repeats=1).fit(gpu.split.train)
    assert method.self_influence().shape == (300,)
    truth = subset_ground_truth(gpu, n_subsets=10, cache_dir=tmp_path, device="cuda")
    scores = get_method("tracin", gpu.task(), device="cuda").fit(gpu.split.train).attribute(gpu.split.test).scores
    assert -1 <= lds(scores, truth.masks, truth.measurements)[0] <= 1


def test_ekfac_on_a_cnn_on_cuda_matches_cpu(monkeypatch):
    # cuDNN convolutions run in TF32 by default (0.6% apart from the CPU here); compare our code, not that setting
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from tda_explorer import AttributionTask
    from tda_explorer.compute.models.reference import make_model
    from tda_explorer.data.digits import load_augmented_digits

    split = load_augmented_digits(n_train=400, n_test=20)
    task = AttributionTask(make_model("cnn", split.train.inputs.shape[1], 10), weight_decay=1e-3)
    a = get_method("if-ekfac", task).fit(split.train).attribute(split.test).scores
    b = get_method("if-ekfac", task, device="cuda").fit(split.train).attribute(split.test).scores
    assert ((a - b).abs().max() / a.abs().max()) < 1e-3


def test_removal_estimators_and_retraining_on_cuda_match_cpu(experiments):
    from tda_explorer.compute.methods.dvemb import record_experiment_run
    from tda_explorer.retraining import Retrainer

    exp, _ = experiments
    ids = exp.split.train.ids
    groups = [list(ids[:20]), list(ids[50:60]), [ids[7]]]
    out = {}
    for dev in ("cpu", "cuda"):
        synset = get_method("synset-loo", exp.task(), trajectory=exp.trajectory(), distill_steps=50,
                            device=dev).fit(exp.split.train)
        rec = record_experiment_run(exp.task(), exp.split.train, exp.factory, exp.config, 0, projection_dim=256,
                                    device=dev)
        out[dev] = (synset.estimate_removals(groups, exp.split.test), Retrainer(exp, device=dev).remove(groups).delta,
                    get_method("dvemb", exp.task(), recording=rec, device=dev).fit(exp.split.train)
                    .attribute(exp.split.test).scores)
    for a, b, tol in zip(out["cpu"], out["cuda"], (2e-2, 1e-4, 1e-5)):  # the synset is fitted in float32
        a, b = a.double().cpu(), b.double().cpu()
        assert float((a - b).abs().max() / a.abs().max()) < tol


def test_streaming_topk_on_cuda_matches_cpu(tmp_path):
    write_random_store = benchmark_module("bench_topk").write_random_store

    from tda_explorer.compute.engine.topk import topk_scores

    store = write_random_store(tmp_path / "f.npy", 5000, 64)
    queries = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    cpu = topk_scores(store, queries, 7, max_memory=2**16)
    gpu = topk_scores(store, queries, 7, max_memory=2**16, device="cuda")
    for side in cpu:
        assert gpu[side][0].device.type == "cpu" and torch.equal(gpu[side][1], cpu[side][1])
        torch.testing.assert_close(gpu[side][0], cpu[side][0], rtol=1e-4, atol=1e-4)


def test_logra_on_a_transformer_on_cuda_matches_cpu():
    from tda_explorer import AttributionTask
    from tda_explorer.compute.engine.kfac import linear_layer_names

    exp = build_experiment("transformer", n_train=64, n_test=8, epochs=2)
    task = AttributionTask(exp.record.model, parameters=linear_layer_names(exp.record.model))
    options = {"projection_kind": "logra", "projection_dim": 8}
    a = get_method("grad-dot", task, **options).fit(exp.split.train).attribute(exp.split.test).scores
    b = get_method("grad-dot", task, device="cuda", **options).fit(exp.split.train).attribute(exp.split.test).scores
    assert ((a - b).abs().max() / a.abs().max()) < 1e-3
