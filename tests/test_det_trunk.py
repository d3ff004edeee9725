"""The frozen pretrained trunk of the offline CLIP (`pas.models.det_trunk`): the cut graph, what it
computes, and that its features do not depend on threads or batching (the `models` stage's bytes)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pas.models.det_trunk import NODES, DetTrunk, cut_graph, default_det_model


def test_cut_graph_outputs_the_backbone_maps_and_drops_the_head():
    import onnx

    full = onnx.load(str(default_det_model()))
    cut = onnx.load_from_string(cut_graph(default_det_model(), NODES))
    assert [o.name for o in cut.graph.output] == list(NODES)
    assert 0 < len(cut.graph.node) < len(full.graph.node)
    # nothing after the backbone: the last stage's output feeds only the neck, which is gone
    assert any(NODES[-1] in n.input for n in full.graph.node)
    assert not any(NODES[-1] in n.input for n in cut.graph.node)
    with pytest.raises(ValueError, match="no node outputs"):
        cut_graph(default_det_model(), ["not-a-node"])


def test_features_are_mean_and_max_pools_of_the_maps():
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    sess = ort.InferenceSession(cut_graph(default_det_model(), NODES), providers=["CPUExecutionProvider"])
    maps = sess.run(list(NODES), {sess.get_inputs()[0].name: np.ascontiguousarray(x[:, ::-1])})   # BGR
    assert [m.shape[1] for m in maps] == [192, 384]          # PPLCNetV3 stages 4 and 5
    for got, m in zip(DetTrunk(threads=1).maps(x), maps):   # the maps themselves, from RGB input
        np.testing.assert_array_equal(got, m)
    f = DetTrunk(threads=1)(x)
    want = np.concatenate([maps[0].mean((2, 3)), maps[0].max((2, 3)), maps[1].mean((2, 3)), maps[1].max((2, 3))], 1)
    assert f.shape == (2, 1152)
    np.testing.assert_array_equal(f, want)


def test_features_do_not_depend_on_threads_batching_or_pickling():
    x = np.random.default_rng(1).standard_normal((6, 3, 96, 96)).astype(np.float32)
    one = DetTrunk(threads=1)
    ref = one(x)
    two = pickle.loads(pickle.dumps(DetTrunk(threads=2)))      # a worker's copy: no session pickled
    np.testing.assert_array_equal(two(x), ref)
    np.testing.assert_array_equal(np.concatenate([one(x[:1]), one(x[1:4]), one(x[4:])]), ref)
    assert pickle.loads(pickle.dumps(one))._sess is None
