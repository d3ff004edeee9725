"""Evaluation of a pretrained backbone on the eval sets (paper App. D.3): kNN and linear probe.

kNN (D.3.3): "for every image in the training subset … store the embedding; … identify the closest embedding
from the training subset (cosine similarity); the predicted class is the class of its nearest training image."
Linear probe (D.3.1): frozen backbone + one linear layer, 100 epochs; ResNets: SGD with the LR ×0.1 at
epochs 60 and 80; ViTs: AdamW with a cosine schedule. Features are extracted once (no augmentation) and
the layer is trained on them, which is the same model as a frozen backbone and much cheaper.
Every number is reported for the pretrained backbone and for a baseline of the same architecture
(random init from `models/backbone_init`, or a user checkpoint), so each commit shows the gain of pretraining.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pas.params import check_choice
from pas.train.evalsets import EvalParams

log = logging.getLogger(__name__)


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_predict(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, n_classes: int, k: int = 1,
                weighting: str = "uniform", temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Predicted class of each test embedding from its k nearest training embeddings by cosine similarity:
    lightly's kNN classifier (`lightly.utils.benchmarking.knn_predict`, Wu et al. 2018).

    dino: vote weight exp(cos/T), as in DINO's eval_knn and lightly; uniform: one vote per neighbour
    (T = ∞, so exp(cos/T) = 1 exactly). With k = 1 (the paper's) both are the nearest image's class.
    """
    import torch
    from lightly.utils.benchmarking import knn_predict as lightly_knn

    check_choice("weighting", weighting, ("uniform", "dino"))
    bank = torch.from_numpy(_l2n(train_z)).T.contiguous()                  # (D, N), as lightly takes it
    labels = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    te = torch.from_numpy(_l2n(test_z))
    k = min(k, bank.shape[1])
    t = temperature if weighting == "dino" else math.inf
    with torch.no_grad():
        preds = [lightly_knn(te[s:s + chunk], bank, labels, n_classes, knn_k=k, knn_t=t)[:, 0]
                 for s in range(0, len(te), chunk)]
    return torch.cat(preds).numpy().astype(np.int64) if preds else np.empty(0, dtype=np.int64)


def linear_probe(train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, n_classes: int, *,
                 epochs: int = 100, optimizer: str = "adamw", lr: float | None = None, weight_decay: float = 0.0,
                 batch_size: int = 256, seed: int = 0) -> np.ndarray:
    """Train one linear layer on frozen features; return test predictions.

    Features are standardised with the training mean/std first (a BatchNorm without affine, as in MAE's
    probe), so random-init and pretrained backbones get the same optimiser settings.
    sgd: momentum 0.9, LR ×0.1 at 60% and 80% of the epochs (60/80 of 100); adamw: cosine to 0 per step.
    """
    import torch

    check_choice("optimizer", optimizer, ("adamw", "sgd"))
    g = torch.Generator().manual_seed(seed)
    xtr = torch.as_tensor(np.asarray(train_z, dtype=np.float32))
    xte = torch.as_tensor(np.asarray(test_z, dtype=np.float32))
    ytr = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    mu, sd = xtr.mean(0, keepdim=True), xtr.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    layer = torch.nn.Linear(xtr.shape[1], n_classes)
    with torch.no_grad():
        bound = 1 / np.sqrt(xtr.shape[1])
        layer.weight.uniform_(-bound, bound, generator=g)
        layer.bias.zero_()
    n = len(xtr)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt, sched = probe_optimizer(layer.parameters(), optimizer, lr, weight_decay, epochs, steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            b = perm[s:s + batch_size]
            loss = torch.nn.functional.cross_entropy(layer(xtr[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return layer(xte).argmax(1).numpy()


def probe_optimizer(params, optimizer: str, lr: float | None, weight_decay: float, epochs: int,
                    steps_per_epoch: int):
    """The paper's probe schedules (App. D.3.1), stepped per batch.

    sgd: momentum 0.9, LR ×0.1 after 60% and 80% of the epochs (epochs 60 and 80 of 100);
    adamw: cosine from `lr` to 0 over all steps.
    """
    import torch

    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr or 0.1, momentum=0.9, weight_decay=weight_decay)
        milestones = [int(0.6 * epochs) * steps_per_epoch, int(0.8 * epochs) * steps_per_epoch]
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    opt = torch.optim.AdamW(params, lr=lr or 1e-2, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y)
    return float((np.asarray(pred) == y).mean()) if len(y) else float("nan")


def extract_features(model, set_dir: str | Path, split: str, transform, batch_size: int = 128,
                     device: str = "cpu", progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features (N, d) float32 and labels (N,) of one written split."""
    import torch
    from tqdm import tqdm

    from pas.io.shards import iter_samples

    model.eval()
    feats, labels, batch = [], [], []

    def flush():
        with torch.no_grad():
            feats.append(model(torch.stack(batch).to(device)).float().cpu().numpy())
        batch.clear()

    for s in tqdm(iter_samples(Path(set_dir) / split), desc=f"{Path(set_dir).name}/{split}", disable=not progress,
                  leave=False):
        batch.append(transform(s.pil()))
        labels.append(int(s.meta["label"]))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not labels:
        raise ValueError(f"{Path(set_dir) / split}: no samples (rerun the `evalsets` stage)")
    return np.concatenate(feats), np.asarray(labels, dtype=np.int64)


def score_backbone(model, set_dir: str | Path, transform, cfg: EvalParams, linear_optimizer: str,
                   device: str, progress: bool = True) -> dict:
    """kNN and linear-probe top-1 of one backbone on one eval set."""
    from pas.train.evalsets import read_classes

    n_classes = len(read_classes(set_dir))
    ztr, ytr = extract_features(model, set_dir, "train", transform, cfg.batch_size, device, progress)
    zte, yte = extract_features(model, set_dir, "test", transform, cfg.batch_size, device, progress)
    knn = knn_predict(ztr, ytr, zte, n_classes, cfg.knn_k, cfg.knn_weighting, cfg.knn_temperature)
    lin = linear_probe(ztr, ytr, zte, n_classes, epochs=cfg.linear_epochs, optimizer=linear_optimizer,
                       lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay, batch_size=cfg.linear_batch_size,
                       seed=cfg.seed)
    return {"knn_top1": accuracy(knn, yte), "linear_top1": accuracy(lin, yte),
            "n_train": int(len(ytr)), "n_test": int(len(yte)), "n_classes": n_classes}


def evaluate(cfg: EvalParams, backbone_dir: str | Path, init_dir: str | Path, evalsets_dir: str | Path,
             progress: bool = True) -> dict:
    """Score the pretrained backbone and the baseline on every eval set; returns the metrics dict.

    Both are fed the pretrained backbone's input size and normalisation (timm's data config).
    """
    import timm
    import torch

    from pas.models.backbone import create_backbone, is_vit, read_config
    from pas.device import resolve_device

    device = resolve_device(cfg.device, cfg.threads)
    backbone_dir, init_dir, evalsets_dir = Path(backbone_dir), Path(init_dir), Path(evalsets_dir)
    bcfg = read_config(backbone_dir)
    torch.manual_seed(cfg.seed)
    pretrained = create_backbone(backbone_dir).to(device)
    baseline = create_backbone(init_dir, pretrained_weights=cfg.baseline_checkpoint).to(device)
    if read_config(init_dir)["architecture"] != bcfg["architecture"]:
        raise ValueError(f"{init_dir} ({read_config(init_dir)['architecture']}) and {backbone_dir} "
                         f"({bcfg['architecture']}) differ: rerun pretrain")
    data_cfg = timm.data.resolve_data_config({}, model=pretrained)
    data_cfg["input_size"] = tuple(bcfg["pretrained_cfg"]["input_size"])
    transform = timm.data.create_transform(**data_cfg, is_training=False)
    opt = cfg.linear_optimizer if cfg.linear_optimizer != "auto" else ("adamw" if is_vit(bcfg) else "sgd")

    train_info_path = backbone_dir / "pretrain.json"
    train_info = json.loads(train_info_path.read_text()) if train_info_path.is_file() else {}
    sets: dict[str, Any] = {}
    for spec in cfg.specs:
        if not spec.evaluate:             # a leakage-only set (no train split)
            continue
        set_dir = evalsets_dir / spec.name
        if not (set_dir / "classes.json").is_file():
            raise FileNotFoundError(f"eval set {spec.name!r}: {set_dir} not written (run the `evalsets` stage)")
        res = {which: score_backbone(model, set_dir, transform, cfg, opt, device, progress)
               for which, model in (("pretrained", pretrained), ("baseline", baseline))}
        counts = {k: res["pretrained"].pop(k) for k in ("n_train", "n_test", "n_classes")}
        for k in counts:
            res["baseline"].pop(k)
        sets[spec.name] = {**counts, **res,
                           "gain_knn_top1": res["pretrained"]["knn_top1"] - res["baseline"]["knn_top1"],
                           "gain_linear_top1": res["pretrained"]["linear_top1"] - res["baseline"]["linear_top1"]}
    return {
        "backbone": bcfg["architecture"],
        "image_size": int(data_cfg["input_size"][-1]),
        "baseline": cfg.baseline_checkpoint or "random_init",
        "knn_k": cfg.knn_k, "linear_epochs": cfg.linear_epochs, "linear_optimizer": opt,
        # paper Figs 6-7 axes: size of the pretraining set and compute spent on it
        "pretrain_images": train_info.get("n_images"),
        "pretrain_epochs": train_info.get("epochs"),
        "pretrain_forward_passes": train_info.get("forward_passes"),
        "sets": sets,
    }
