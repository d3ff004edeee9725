"""models/backbone_init and models/backbone: timm folders that timm alone can load."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from pas.models.backbone import create_backbone, is_vit, read_config, save_backbone, write_backbone_init
from tests.train_helpers import TINY_VIT


def _equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_init_is_seeded_and_loadable_by_timm_alone(tmp_path):
    a = write_backbone_init(TINY_VIT, tmp_path / "a")
    b = write_backbone_init(TINY_VIT, tmp_path / "b")
    c = write_backbone_init({**TINY_VIT, "seed": 1}, tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    ours = create_backbone(a)
    theirs = timm.create_model(f"local-dir:{a}", pretrained=True)          # the README recipe
    assert _equal(ours, theirs)
    cfg = read_config(a)
    older = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],  # the older-timm recipe
                              pretrained_cfg_overlay={"file": str(a / "model.safetensors")})
    assert _equal(ours, older)
    assert theirs(torch.zeros(2, 3, 32, 32)).shape == (2, 192)               # num_classes=0: pooled features
    data_cfg = timm.data.resolve_data_config({}, model=theirs)
    assert data_cfg["input_size"] == (3, 32, 32)
    assert "license" not in cfg["pretrained_cfg"] and cfg["pretrained_cfg"]["tag"] == "pas"
    assert is_vit(cfg) and is_vit(ours)


def test_cnn_records_training_size_and_external_weights(tmp_path):
    spec = {"kind": "timm", "name": "resnet10t", "seed": 0}
    init = write_backbone_init(spec, tmp_path / "init")
    model = create_backbone(init)
    assert not is_vit(read_config(init)) and not is_vit(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save_backbone(model, tmp_path / "trained", image_size=48)
    cfg = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 48, 48]
    assert "test_input_size" not in cfg["pretrained_cfg"]
    # a user checkpoint given as a file or as a folder replaces the folder's own weights
    for w in (tmp_path / "trained" / "model.safetensors", tmp_path / "trained"):
        assert _equal(create_backbone(init, pretrained_weights=w), model)
    assert not _equal(create_backbone(init), model)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        write_backbone_init({"kind": "timm", "name": "no_such_net"}, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="models"):
        create_backbone(tmp_path / "missing")
    init = write_backbone_init(TINY_VIT, tmp_path / "vit")
    other = write_backbone_init({"kind": "timm", "name": "resnet10t"}, tmp_path / "cnn")
    with pytest.raises(ValueError, match="do not fit"):
        create_backbone(init, pretrained_weights=other)
