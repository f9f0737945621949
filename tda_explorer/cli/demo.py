"""``tda-explorer demo``: digits with label noise, a model with checkpoints, an attribution, the mislabel ranking and
one test example's proponents and opponents."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tda_explorer.cli.common import _interactive, _progress
from tda_explorer.cli.tasks import _data_name, _model_argument
from tda_explorer.compute.methods import available_methods
from tda_explorer.errors import TDAError
from tda_explorer.evaluate import mislabel_auc, recall_at
from tda_explorer.experiments import build_experiment
from tda_explorer.session import Session


def _check_test_id(test_id: int, n_test: int) -> int:
    """``--test-id`` must be a position in the test set (0 .. n_test - 1)."""
    if not 0 <= test_id < n_test:
        raise TDAError(f"--test-id {test_id} is out of range: the test set has {n_test} examples, so pass a test id "
                       f"from 0 to {n_test - 1}")
    return test_id


def _proponents_opponents(top, k: int = 5):
    """Split a ranking frame by sign: proponents are the positive scores (strongest first), opponents the negative
    ones (most negative first), ``k`` each, ranked 1..k and -1..-k; a side with no such score is empty."""
    frame = top.drop_duplicates("train_id")
    pro = frame[frame["score"] > 0].sort_values("score", ascending=False).head(k).copy()
    opp = frame[frame["score"] < 0].sort_values("score", ascending=True).head(k).copy()
    pro["rank"] = range(1, len(pro) + 1)
    opp["rank"] = [-r for r in range(1, len(opp) + 1)]
    return pro, opp


def _sides_text(top, columns: list[str], k: int = 5, snippet=None) -> str:
    """The proponents and opponents of one test example as two tables (``none`` for an empty side)."""
    lines = []
    titles = ("Proponents (positive scores, strongest first)", "Opponents (negative scores, strongest first)")
    for title, side in zip(titles, _proponents_opponents(top, k)):
        if snippet is not None:
            side["text"] = [snippet(i) for i in side["train_id"]]
        lines += [f"{title}:", side[columns].to_string(index=False) if len(side) else "  none"]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Digits with label noise → MLP with checkpoints → TracIn → mislabel ranking and proponents."""
    if args.n_test > 0:  # (a bad --n-test gets the loader's own message)
        _check_test_id(args.test_id, args.n_test)  # before minutes of training, not after
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _progress(range(3), "demo", total=3)
    print(f"Loading {_data_name(args.model)} ({args.n_train} train / {args.n_test} test), flipping "
          f"{args.noise:.0%} of the training labels (seed {args.seed}); training a {args.model.upper()} with "
          "checkpoints…", flush=True)
    exp = build_experiment(args.model, noise=args.noise, seed=args.seed, n_train=args.n_train,
                           n_test=args.n_test, epochs=args.epochs, progress=_interactive())
    steps.update()
    session = Session.from_experiment(exp, folder=out / "session")
    t0 = time.perf_counter()
    attribution = session.compute(args.method)
    seconds = time.perf_counter() - t0
    steps.update()
    flipped = exp.split.flipped
    print(f"\nTest accuracy: {exp.test_accuracy():.3f}")
    print(f"Attribution: {args.method} over {len(exp.record.checkpoints)} checkpoints in {seconds:.2f}s "
          f"({len(session.test)} × {len(session.train)} scores)")

    ranking = session.mislabel_ranking(args.method)
    ranking["truly_flipped"] = flipped[session.train.positions(ranking["train_id"].tolist())].tolist()
    shown = min(10, len(ranking))
    print(f"\nThe {shown} training example{'s' if shown != 1 else ''} most likely mislabeled (self-influence, "
          "highest first):")
    print(ranking.head(shown)[["rank", "train_id", "label", "predicted", "suggested", "score", "truly_flipped"]]
          .to_string(index=False))
    if flipped.any():
        score = session.self_influences[args.method]
        print(f"\nMislabel detection: ROC-AUC {mislabel_auc(score, flipped):.3f}; recall of flipped labels after "
              f"inspecting the top 10%: {recall_at(score, flipped, 0.1):.3f}, top 20%: "
              f"{recall_at(score, flipped, 0.2):.3f}")
        baseline = session.baseline_comparison(args.method)
        print(f"Beside the training-loss baseline (examples by the model's loss at their given label): ROC-AUC "
              f"{baseline['loss_auc']:.3f} ({baseline['auc_minus_loss']:+.3f} for {args.method}), recall after the "
              f"top 10% {baseline['loss_recall_at_10']:.3f} ({baseline['recall_at_10_minus_loss']:+.3f}); rank "
              f"correlation of the two rankings {baseline['spearman']:.2f}")

    test_id = session.test.ids[_check_test_id(args.test_id, len(session.test))]
    pos = session.test.positions([test_id])[0]
    print(f"\nTest example #{test_id} (label {int(session.test.labels[pos])}, predicted "
          f"{int(session.test_predicted[pos])}): top-5 proponents and opponents")
    columns = ["rank", "train_id", "score", "label", "predicted"]
    text = session.train.renderer.kind == "text"
    if text:
        print(f"  “{session.test.renderer.snippet(test_id)}”")
        columns.append("text")
    print(_sides_text(session.ranking(test_id, args.method, k=5), columns, k=5,
                      snippet=session.train.renderer.snippet if text else None))

    ranking.to_csv(out / "mislabel_ranking.csv", index=False)
    attribution.to_dataframe(k=10).to_csv(out / "proponents_opponents_top10.csv", index=False)
    session.test_table().to_csv(out / "test_examples.csv", index=False)
    steps.update()
    steps.close()
    print(f"\nWrote mislabel_ranking.csv, proponents_opponents_top10.csv and test_examples.csv to {out.resolve()}")
    print(f"Flags you set in the explorer are kept in {(out / 'session' / 'flags.sqlite').resolve()}")
    return 0


def _demo_arguments(demo: argparse.ArgumentParser, method: str | None = None) -> None:

    demo.add_argument("--out", default="tda_output", help="folder for the ranked tables (default: tda_output)")
    _model_argument(demo)
    demo.add_argument("--method", default="tracin", choices=available_methods(),
                      help="the attribution method (default tracin)")
    demo.add_argument("--noise", type=float, default=0.1, help="fraction of training labels flipped (default 0.1)")
    demo.add_argument("--n-train", type=int, default=1000, help="training examples (default 1000)")
    demo.add_argument("--n-test", type=int, default=300, help="test examples (default 300)")
    demo.add_argument("--epochs", type=int, default=None, help="override the model's training epochs")
    demo.add_argument("--test-id", type=int, default=0,
                      help="test example whose proponents and opponents are printed (0 .. n-test - 1; default 0)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the data split, label noise and training")
    demo.set_defaults(func=cmd_demo)
