"""Adapters that run peer libraries on our experiments, in the same process (optional extras).

Install with ``make bench-deps``: cleanlab, and dattri, kronfluence (with the few packages kronfluence
imports) and dattri-llm with ``--no-deps`` so that none of them can replace torch. Each adapter returns
scores as ``[n_test, n_train]`` with our sign convention (loss-oriented, positive = proponent) and its wall
time, fitting included. The influence-function peers were checked against our ``if-cg`` (mean per-test-row
Spearman > 0 on digits LR and MLP): dattri's, kronfluence's and dattri-llm's native signs are already ours.

dattri-llm 0.1 (TRAIS Lab, the LLM-scale companion of dattri) needs only torch and tqdm for what is used
here. Its one-call live ``attribute(train_dataset, test_dataset)`` goes through ``GradientStreamer``, which
imports ``transformers`` (for ``set_seed`` on entering each pass) and is therefore not used; the adapter
takes the path its README names as the core install's: capture per-sample gradients with a ``HookManager``
(``OffloadCallback`` into an in-memory ``GradientStorageManager``) around our own forward/backward, then
``KFACAttributor`` / ``EKFACAttributor.attribute_from_cache``. It runs on a CPU.

Not adapted: bergson 2.5 (EleutherAI), built for causal language models, not for a ``nn.Sequential``
classifier on feature vectors:

* ``import bergson`` (any submodule runs the package ``__init__``) imports ``transformers`` (>= 5),
  ``datasets``, ``peft``, ``pyarrow``, ``jaxtyping``, ``ml_dtypes`` and ``simple_parsing``; its metadata also
  asks for torchvision, torchaudio, bitsandbytes and torchopt, which would pull another torch.
* Its gradient collection (``CollectorComputer`` under ``collect_gradients`` and the Hessian/EK-FAC
  ``fit_factored_hessians``) takes a ``transformers.PreTrainedModel`` (``model.device``, ``model.base_model``)
  and a Hugging Face ``datasets.Dataset`` of ``input_ids``, and its loss is hard-wired to next-token
  cross-entropy, ``model(x).logits[:, :-1]`` against ``labels[:, 1:]``; its pipelines load the model and the
  data by name with ``from_pretrained`` / ``load_dataset``, i.e. from the hub.
* It does run on a CPU, so a GPU is not the obstacle: using it would mean dressing our classifier up as a
  one-token language model (the example's index as a token, the label as the next token) behind a fake
  ``PreTrainedModel`` and installing the Hugging Face stack, which would measure the costume, not bergson.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time

import torch
from torch import nn

from tda_explorer.compute.training.train import out_of_fold_probabilities, train_ensemble, unstack
from tda_explorer.experiments.digits import Experiment


def available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _loaders(exp: Experiment, batch_size: int | None = 64):
    """Unshuffled train and test loaders; ``batch_size=None`` puts each split in one batch."""
    from torch.utils.data import DataLoader, TensorDataset

    tr, te = exp.split.train, exp.split.test
    train = DataLoader(TensorDataset(tr.inputs, tr.labels), batch_size=batch_size or len(tr), shuffle=False)
    test = DataLoader(TensorDataset(te.inputs, te.labels), batch_size=batch_size or len(te), shuffle=False)
    return train, test


def dattri_scores(exp: Experiment, method: str, ensemble: int = 1, device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Grad-Dot, Grad-Cos, TracIn or TRAK through dattri 0.3 with its defaults (512-d projection)."""
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = exp.factory(0).to(device).eval()
    ce = nn.CrossEntropyLoss()

    def loss_func(params, data):
        x, y = data
        return ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))

    def margin(params, data):
        x, y = data
        logp = -ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0))
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data):
        x, y = data
        return torch.exp(-ce(torch.func.functional_call(model, params, x.unsqueeze(0)), y.unsqueeze(0)))

    train_loader, test_loader = _loaders(exp)
    # dattri's defaults (512-d projection) with the device set: its default projector device is "cpu"
    projector = {"proj_dim": 512, "proj_max_batch_size": 32, "proj_seed": 0, "device": device}
    final = exp.record.model.state_dict()
    t0 = time.perf_counter()
    if method in ("grad-dot", "grad-cos"):
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=[final])
        attributor = TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=method == "grad-cos",
                                      device=device, projector_kwargs=projector)
        scores = attributor.attribute(train_loader, test_loader)
    elif method == "tracin":
        ckpts = [c.state_dict for c in exp.record.checkpoints]
        lrs = torch.tensor([c.learning_rate for c in exp.record.checkpoints])
        task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ckpts)
        scores = TracInAttributor(task, weight_list=lrs, normalized_grad=False, device=device,
                                  projector_kwargs=projector).attribute(
            train_loader, test_loader)
    elif method == "trak":
        states = [final]
        if ensemble > 1:
            tr = exp.split.train
            stacked = train_ensemble(exp.factory, tr.inputs, tr.labels, torch.arange(len(tr)).expand(ensemble - 1, -1),
                                     exp.config, seeds=[exp.config.seed + 1 + i for i in range(ensemble - 1)])
            states += [unstack(stacked, i) for i in range(ensemble - 1)]
        task = AttributionTask(loss_func=margin, model=model, checkpoints=states)
        attributor = TRAKAttributor(task, correct_probability_func=correct_probability, device=device,
                                    projector_kwargs=projector)
        attributor.cache(train_loader)
        scores = attributor.attribute(test_loader)
    else:
        raise ValueError(f"no dattri adapter for {method}")
    return scores.T.contiguous().float(), time.perf_counter() - t0


@contextlib.contextmanager
def _memory_cap(device: str, margin: int = 2 << 30):
    """Cap this process's address space at what the machine has free (less ``margin``) while a peer runs.

    A peer that asks for more memory than there is then fails with an allocation error in this process
    instead of waking the kernel's OOM killer, which might take another process with it. CPU on Linux
    only (CUDA reserves huge virtual ranges); elsewhere it does nothing.
    """
    try:
        import resource

        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
        with open("/proc/self/status") as f:
            used = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration):
        free = used = None
    if device != "cpu" or free is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + max(free - margin, 0)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


#: dattri 0.3's influence-function attributors, by the solver name the adapter takes.
DATTRI_IF_SOLVERS = ("explicit", "cg", "lissa", "arnoldi", "datainf", "ekfac")


def dattri_influence_scores(exp: Experiment, solver: str, device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Influence functions through dattri 0.3 (``IFAttributor*``), at the final model, dattri's defaults otherwise.

    The loss is the mean cross-entropy of the batch it gets (dattri calls it per example for the gradients
    and on the full training batch for the curvature). Both loaders hold a single batch: dattri sums one
    iHVP per batch of the "full" training loader (a sum of per-batch inverses, not the inverse of the mean),
    and recomputes the test transformation for every (train batch, test batch) pair, so one batch each is
    both the exact curvature of the mean loss and the least work. Damping: our objective is mean CE +
    wd/2 ||θ||², whose Hessian is H_CE + wd·I, so wherever dattri's default of 0 leaves a singular solve
    (softmax's shift invariance makes H_CE singular even for the linear model) we pass wd; see each branch.
    dattri's sign is already ours (g_trainᵀ (H + λI)⁻¹ g_test, positive = proponent); only the scale differs
    (no 1/n), which LDS, a per-test-row rank statistic, does not see.
    """
    from dattri.algorithm import influence_function as inf
    from dattri.task import AttributionTask

    model = exp.factory(0).to(device).eval()
    ce = nn.CrossEntropyLoss()

    def loss_func(params, data):
        x, y = data
        # dattri's LiSSA collate casts every data tensor to float, labels included
        return ce(torch.func.functional_call(model, params, x), y.long())

    wd = exp.config.weight_decay
    final = {k: v.to(device) for k, v in exp.record.model.state_dict().items()}
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=[final])
    train_loader, test_loader = _loaders(exp, batch_size=None)
    t0 = time.perf_counter()
    if solver == "explicit":
        # dense Hessian (torch.func.hessian) + torch.linalg.solve; regularization 0 would be singular -> wd
        attributor = inf.IFAttributorExplicit(task, device=device, regularization=wd)
    elif solver == "cg":
        # defaults: 10 CG iterations, tol 1e-7, rev-rev HVPs; regularization 0 -> singular system -> wd
        attributor = inf.IFAttributorCG(task, device=device, regularization=wd)
    elif solver == "lissa":
        # defaults: batch 1, depth 5000, 1 repeat, scaling 50. LiSSA's fixed point is (H + damping·scaling·I)⁻¹,
        # so damping = wd/scaling gives the objective's wd·I; with 0 the null directions of H_CE grow with
        # the recursion depth instead of converging.
        attributor = inf.IFAttributorLiSSA(task, device=device, damping=wd / 50.0)
    elif solver == "arnoldi":
        # defaults: 100 Arnoldi iterations, the 100 Ritz pairs of largest |eigenvalue| kept and only those
        # inverted, so the default regularization 0 is not a singular solve and is kept (passing wd does not
        # rescue the MLP, where some of the 100 are negative and the scores come out NaN: checked)
        attributor = inf.IFAttributorArnoldi(task, device=device)
    elif solver == "datainf":
        # DataInf divides by its regularization (per-layer damped empirical Fisher): 0 divides by zero -> wd
        attributor = inf.IFAttributorDataInf(task, device=device, regularization=wd)
    elif solver == "ekfac":
        # all nn.Linear modules, empirical Fisher (the task's loss, with the given labels: dattri's
        # design); its corrected eigenvalues can be 0 (e.g. the softmax's shift direction), so damping -> wd.
        # Run as shipped, though dattri 0.3.0's EK-FAC scores about as well as Grad-Dot here: its transform
        # reshapes [W.flatten(), b] straight to (out, in + 1), so the bias is not the last column, and it
        # rotates with q @ v @ q.T although eigh returns eigenvectors as columns. With both patched (a check,
        # not done here) it matches kronfluence's EK-FAC on the empirical Fisher to 4 digits of LDS.
        attributor = inf.IFAttributorEKFAC(task, device=device, damping=wd)
    else:
        raise ValueError(f"no dattri influence solver {solver!r}; choose from {DATTRI_IF_SOLVERS}")
    # dattri takes the model's parameters as they are (requires_grad=True), so everything it computes with
    # torch.func also records an outer autograd graph: LiSSA's 5,000 recursion steps then keep every step
    # alive (14 GiB and out of memory on the MLP). torch.func ignores an outer no_grad, so this changes
    # nothing in the maths; EK-FAC alone needs the graph (it calls loss.backward() in its hooks).
    # The dense Hessian goes through torch.func.hessian, whose forward-mode pass holds one activation per
    # parameter: 9,610 x 1,000 x 128 floats on the MLP, 4.9 GB a tensor, and it keeps several alive.
    try:
        with _memory_cap(device), contextlib.nullcontext() if solver == "ekfac" else torch.no_grad():
            attributor.cache(train_loader)
            scores = attributor.attribute(train_loader, test_loader)
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "can't allocate memory" not in str(err):
            raise
        raise MemoryError(f"dattri IFAttributor {solver!r} ran out of memory: {str(err)[:200]}") from err
    if not torch.isfinite(scores).all():
        # seen with arnoldi on the MLP: its 100 Ritz values (max_iter = proj_dim = 100) include negative ones of
        # the indefinite Hessian, which dattri warns about but still divides by sqrt(eigenvalue) -> NaN
        raise FloatingPointError(f"dattri IFAttributor {solver!r} gave non-finite scores "
                                 f"({int((~torch.isfinite(scores)).sum())} of {scores.numel()})")
    return scores.detach().T.contiguous().float().cpu(), time.perf_counter() - t0


def kronfluence_scores(exp: Experiment, strategy: str = "ekfac", device: str = "cpu",
                       damping: float | str | None = "wd") -> tuple[torch.Tensor, float]:
    """Influence functions through kronfluence 1.0 (EK-FAC or K-FAC), true Fisher, on the final model.

    Kronfluence's defaults, except: ``damping="wd"`` (the default here) passes the task's weight decay as
    ``damping_factor`` (our objective's Hessian is H_CE + wd·I; kronfluence's own default, 1e-8, is a
    near-zero damping of a Fisher that is singular along the softmax's shift); ``None`` is kronfluence's
    heuristic (0.1 × mean eigenvalue) and a float is used as given. The true Fisher is kronfluence's
    default (``use_empirical_fisher=False``): the factors use labels sampled from the model, here from a
    seeded generator so reruns agree. The measurement is ours, each test example's cross-entropy. The train
    loss and the measurement are summed over the batch as kronfluence asks, so its gradients are per-example;
    its factors are averages over the examples, so the scores are gᵀ(F + λI)⁻¹g without our 1/n, a scale
    that LDS (a per-test-row rank statistic) does not see. Its sign is already ours: positive = proponent.
    """
    import copy
    import logging
    import tempfile
    import warnings

    import torch.nn.functional as F
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    if strategy not in ("ekfac", "kfac"):
        raise ValueError(f"kronfluence strategy must be 'ekfac' or 'kfac', got {strategy!r}")
    generator = torch.Generator(device=device).manual_seed(exp.config.seed)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's own predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    tr, te = exp.split.train, exp.split.test
    train, test = TensorDataset(tr.inputs, tr.labels), TensorDataset(te.inputs, te.labels)  # it moves batches
    damping_factor = exp.config.weight_decay if damping == "wd" else damping
    t0 = time.perf_counter()
    model = prepare_model(copy.deepcopy(exp.record.model), Classification())  # it wraps modules in place
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its torch.cuda.amp.GradScaler, disabled anyway
        analyzer = Analyzer("peers", model, Classification(), cpu=device == "cpu", disable_tqdm=True,
                            log_level=logging.WARNING, output_dir=out)
        analyzer.fit_all_factors("factors", train, per_device_batch_size=len(train),
                                 factor_args=FactorArguments(strategy=strategy))
        analyzer.compute_pairwise_scores("scores", "factors", query_dataset=test, train_dataset=train,
                                         per_device_query_batch_size=len(test),
                                         per_device_train_batch_size=len(train),
                                         score_args=ScoreArguments(damping_factor=damping_factor))
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.detach().float().cpu(), time.perf_counter() - t0


class IndexedModel(nn.Module):
    """``net`` with an ignored ``idx`` argument, so that dattri-llm's hooks read each sample's id from it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def dattri_llm_scores(exp: Experiment, method: str = "kfac", device: str = "cpu",
                      damping: float | str | None = None) -> tuple[torch.Tensor, float]:
    """K-FAC or EK-FAC influence through dattri-llm 0.1 (``KFACAttributor`` / ``EKFACAttributor``), final model.

    dattri-llm's defaults, except for the plumbing its store-then-attribute path leaves to the caller:

    * Capture: one ``HookManager`` per split (``linear_io`` on every ``nn.Linear``, as in its README) around a
      single forward/backward of the whole split, cross-entropy summed over the batch, so that each captured
      gradient is the example's own (the convention of its examples); the batch size changes nothing but
      speed (checked). The train side uses the given labels: dattri-llm fits its K-FAC factors from the
      training gradients, i.e. the empirical Fisher (it has no sampled-label option). The test side is each
      test example's cross-entropy, our measurement.
    * Sample ids: the model is wrapped to take an ``idx`` argument and ``sample_id_key="idx"``, so rows and
      columns are keyed by dataset position instead of dattri-llm's default content hash of the inputs.
    * Store: ``residency="memory"`` (its in-RAM store, for a capture in the same process) instead of the
      default on-disk store in a temporary directory, which was 3x slower here and changes no score.

    ``damping=None`` (default) is dattri-llm's own, 1e-3 absolute, added to each Kronecker factor (K-FAC:
    ``(A + λI)⁻¹ ⊗ (G + λI)⁻¹``) or to the corrected eigenvalues (EK-FAC); it is not a singular solve, so it
    is kept. ``"wd"`` passes the task's weight decay instead (our objective's Hessian is H_CE + wd·I; the
    kronfluence adapter's default), a float is used as given. The Fisher is a mean over examples, so the
    scores are gᵀ(F + λ)⁻¹g without our 1/n, a scale that LDS does not see; the sign is already ours.
    Checked against a hand-rolled float64 K-FAC / EK-FAC of the same factors: equal to 4e-4 relative.
    """
    import copy
    import tempfile
    import warnings

    import torch.nn.functional as F
    from dattri_llm import REGISTER_ALL, GradientStorageManager, HookManager, HookManagerConfig, OffloadCallback
    from dattri_llm.attribution import AttributionArguments, EKFACAttributor, KFACAttributor

    attributors = {"kfac": KFACAttributor, "ekfac": EKFACAttributor}
    if method not in attributors:
        raise ValueError(f"dattri-llm method must be 'kfac' or 'ekfac', got {method!r}")
    options = {} if damping is None else {"damping": exp.config.weight_decay if damping == "wd" else damping}
    tr, te = exp.split.train, exp.split.test
    t0 = time.perf_counter()
    model = IndexedModel(copy.deepcopy(exp.record.model)).to(device).eval()  # its hooks go on a copy
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        # torch warns that the first layer's full backward hook sees no input gradient (its input is data)
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        stores = {}
        for name, split in (("train", tr), ("test", te)):
            stores[name] = GradientStorageManager(f"{out}/{name}", residency="memory")
            offload = OffloadCallback(offload_interval=1, file_manager=stores[name], recording_type="per_sample")
            hooks = HookManager(model, config=HookManagerConfig(linear_io=REGISTER_ALL), callbacks=[offload],
                                sample_id_key="idx")
            with hooks.collect(deregister_on_exit=True):
                logits = model(split.inputs.to(device), idx=torch.arange(len(split)))
                F.cross_entropy(logits, split.labels.to(device), reduction="sum").backward()
            model.zero_grad(set_to_none=True)
        args = AttributionArguments(output_dir=f"{out}/scores", use_cpu=device == "cpu")
        score = attributors[method](args).attribute_from_cache(stores["train"], stores["test"], **options)
        scores = score.query([str(i) for i in range(len(tr))], [str(j) for j in range(len(te))])
    return scores.T.contiguous().float().cpu(), time.perf_counter() - t0


def cleanlab_suspicion(exp: Experiment, folds: int = 5) -> tuple[torch.Tensor, float]:
    """cleanlab's confident-learning label quality on out-of-fold probabilities of the same model."""
    from cleanlab.rank import get_label_quality_scores

    tr = exp.split.train
    t0 = time.perf_counter()
    probs = out_of_fold_probabilities(exp.factory, tr.inputs, tr.labels, exp.config, folds=folds, seed=exp.config.seed)
    quality = get_label_quality_scores(tr.labels.numpy(), probs.double().numpy())
    return -torch.as_tensor(quality), time.perf_counter() - t0
