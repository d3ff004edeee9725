"""A frozen pretrained image trunk for the offline CLIP: the backbone of rapidocr's PP-OCRv4 text detector.

The only pretrained image network installable offline is the DBNet text detector inside the
`rapidocr-onnxruntime` wheel (also the ood stage's text detector). Its PPLCNetV3 backbone was trained
on natural images with text, so its stride-16 and stride-32 stages see shapes, colours and parts well
beyond text. The offline CLIP's image tower is this backbone, frozen — the ONNX graph cut where the
detector's neck reads it (`NODES`) and run by onnxruntime — with each feature map mean- and max-pooled
and a small MLP head that the `models` stage trains (`pas.models.clip_train`).
benchmarks/frozen_trunk.py measured it against the from-scratch tower (RESULTS-offline-models.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

DET_MODEL = "ch_PP-OCRv4_det_infer.onnx"
# the ends of PPLCNetV3's stages 4 (192 ch, stride 16) and 5 (384 ch, stride 32): the inputs of the
# det neck's 1x1 convs
NODES = ("p2o.Add.147", "p2o.Add.215")
# PaddleOCR normalises BGR images with ImageNet's RGB constants in that order; open_clip's preprocess
# gives RGB, so these are the same constants per RGB channel and `DetTrunk` flips to BGR
RGB_MEAN = (0.406, 0.456, 0.485)
RGB_STD = (0.225, 0.224, 0.229)


def default_det_model() -> Path:
    """The DBNet ONNX file shipped inside the `rapidocr-onnxruntime` wheel."""
    import rapidocr_onnxruntime

    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / DET_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text detector not found; install rapidocr-onnxruntime")
    return path


def cut_graph(model_path: str | Path, outputs: Sequence[str]) -> bytes:
    """The ONNX model reduced to the nodes `outputs` depend on, with `outputs` as its graph outputs."""
    import onnx

    m = onnx.load(str(model_path))
    need, keep = set(outputs), []
    for node in reversed(m.graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(node.input)
    missing = set(outputs) - {o for n in keep for o in n.output}
    if missing:
        raise ValueError(f"{model_path}: no node outputs {sorted(missing)}")
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    del m.graph.output[:]
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in outputs)
    return m.SerializeToString()


class DetTrunk:
    """The cut detector as a feature extractor: (B, 3, H, W) float32 RGB, normalised with RGB_MEAN /
    RGB_STD → (B, 2·ΣC) [mean-pool, max-pool] of each node's map. Picklable: the session is made on
    first use."""

    def __init__(self, nodes: Sequence[str] = NODES, threads: int = 1, model_path: str | Path | None = None):
        self.nodes, self.threads = list(nodes), int(threads)
        self.model_path = str(model_path or default_det_model())
        self._sess = None

    def __getstate__(self):
        return {**self.__dict__, "_sess": None}

    def _session(self):
        if self._sess is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.log_severity_level = 3        # the cut graph's pruned initialisers are warnings, not news
            self._sess = ort.InferenceSession(cut_graph(self.model_path, self.nodes), so,
                                              providers=["CPUExecutionProvider"])
        return self._sess

    def maps(self, x: np.ndarray) -> list[np.ndarray]:
        """The feature map (B, C, H', W') of each node for RGB images x, normalised as above."""
        sess = self._session()
        bgr = np.ascontiguousarray(x[:, ::-1], np.float32)         # the detector reads BGR
        return sess.run(self.nodes, {sess.get_inputs()[0].name: bgr})

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([f for m in self.maps(x) for f in (m.mean((2, 3)), m.max((2, 3)))], axis=1)
