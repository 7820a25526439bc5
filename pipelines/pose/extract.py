"""DWPose whole-body keypoints from local ONNX files (yolox_l.onnx + dw-ll_ucoco_384.onnx).

This is the ONNX route of DWPose (the one controlnet_aux's DWposeDetector took before it moved
to mmpose): YOLOX finds people, RTMPose (SimCC heads) finds 133 COCO-WholeBody keypoints per
person, which are mapped to OpenPose's 18 body points plus 2x21 hand and 68 face points.
Any callable image -> PoseFrame can stand in for the detector (tests inject one).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..loading.sources import WeightsError
from .draw import PoseFrame

log = logging.getLogger(__name__)

DETECTOR_FILE = "yolox_l.onnx"
POSE_FILE = "dw-ll_ucoco_384.onnx"
DWPOSE_REPO = "yzd-v/DWPose"
PoseDetector = Callable[[np.ndarray], PoseFrame]

_POSE_INPUT = (288, 384)  # width, height
_MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
_STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
# COCO-WholeBody body indices (+ synthetic neck at 17) -> OpenPose 18-point order.
_OPENPOSE_FROM_COCO = [0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


def missing_dwpose_message(folder: Path | None) -> str | None:
    """None when both ONNX files are there, else what is missing and where to get it."""
    if folder is None:
        return (f"DWPose pose extraction needs a weights folder: start the app with --weights DIR and put "
                f"{DETECTOR_FILE} and {POSE_FILE} (Hugging Face repo {DWPOSE_REPO}) in DIR/dwpose/. "
                f"A rendered pose video works without them.")
    for name in (DETECTOR_FILE, POSE_FILE):
        if not (folder / name).is_file():
            return (f"DWPose needs {folder / name}: download {DETECTOR_FILE} and {POSE_FILE} from the "
                    f"Hugging Face repo {DWPOSE_REPO} into {folder}. A rendered pose video works without them.")
    return None


def load_dwpose(folder: str | Path | None, providers: list[str] | None = None) -> "DWPoseOnnx":
    """Opens the two ONNX files in folder, or says which file is missing and where to get it."""
    folder = None if folder is None else Path(folder)
    missing = missing_dwpose_message(folder)
    if missing:
        raise WeightsError(missing)
    try:
        import onnxruntime
    except ImportError as exc:
        raise WeightsError("DWPose pose extraction needs onnxruntime: pip install onnxruntime") from exc
    providers = providers or onnxruntime.get_available_providers()
    return DWPoseOnnx(onnxruntime.InferenceSession(str(folder / DETECTOR_FILE), providers=providers),
                      onnxruntime.InferenceSession(str(folder / POSE_FILE), providers=providers))


def decode_yolox(raw: np.ndarray, ratio: float, score_threshold: float = 0.3,
                 nms_threshold: float = 0.45) -> np.ndarray:
    """YOLOX head output [1, N, 85] at 640x640 -> person boxes xyxy [M, 4] in image pixels."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        size = 640 // stride
        ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        grids.append(np.stack((xs, ys), -1).reshape(-1, 2))
        strides.append(np.full((size * size, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    out = raw[0].astype(np.float64)
    centers = (out[:, :2] + grid) * stride
    sizes = np.exp(out[:, 2:4]) * stride
    scores = out[:, 4] * out[:, 5]  # objectness x person-class score
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1) / ratio
    keep = scores > score_threshold
    return _nms(boxes[keep], scores[keep], nms_threshold)


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    order, kept = scores.argsort()[::-1], []
    while order.size:
        best, rest = order[0], order[1:]
        kept.append(best)
        x1 = np.maximum(boxes[best, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[best, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[best, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[best, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
        iou = inter / (area(boxes[best]) + area(boxes[rest]) - inter + 1e-9)
        order = rest[iou <= threshold]
    return boxes[kept]


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """SimCC logits [K, W*r], [K, H*r] -> locations [K, 2] in input pixels and confidences [K]."""
    x, y = simcc_x.argmax(-1), simcc_y.argmax(-1)
    confidence = np.minimum(simcc_x.max(-1), simcc_y.max(-1))
    return np.stack([x, y], -1).astype(np.float64) / split_ratio, confidence


def wholebody_to_pose(keypoints: np.ndarray, scores: np.ndarray, width: int, height: int) -> PoseFrame:
    """[P, 133, 2] pixel keypoints + [P, 133] scores -> normalised OpenPose-style PoseFrame."""
    frame = PoseFrame()
    for points, conf in zip(keypoints, scores):
        pts = np.concatenate([points / [width, height], conf[:, None]], axis=1)
        neck = np.append(pts[[5, 6], :2].mean(0), min(pts[5, 2], pts[6, 2]))
        body = np.concatenate([pts[:17], neck[None]])[_OPENPOSE_FROM_COCO]
        frame.bodies.append(body)
        frame.faces.append(pts[23:91])
        frame.hands.extend([pts[91:112], pts[112:133]])
    return frame


class DWPoseOnnx:
    def __init__(self, detector, estimator) -> None:
        self.detector = detector
        self.estimator = estimator

    def __call__(self, image: np.ndarray) -> PoseFrame:
        """RGB uint8 [H, W, 3] -> PoseFrame of every detected person."""
        bgr = image[..., ::-1]
        height, width = bgr.shape[:2]
        ratio = min(640 / height, 640 / width)
        resized = np.asarray(Image.fromarray(bgr).resize((int(width * ratio), int(height * ratio)), Image.BILINEAR))
        padded = np.full((640, 640, 3), 114, dtype=np.uint8)
        padded[:resized.shape[0], :resized.shape[1]] = resized
        raw = self.detector.run(None, {self.detector.get_inputs()[0].name:
                                       padded.transpose(2, 0, 1)[None].astype(np.float32)})[0]
        boxes = decode_yolox(raw, ratio)
        if not len(boxes):
            return PoseFrame()
        keypoints, scores = zip(*(self._keypoints(bgr, box) for box in boxes))
        return wholebody_to_pose(np.stack(keypoints), np.stack(scores), width, height)

    def _keypoints(self, bgr: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        in_w, in_h = _POSE_INPUT
        center = (box[:2] + box[2:]) / 2
        size = (box[2:] - box[:2]) * 1.25
        if size[0] / size[1] > in_w / in_h:
            size[1] = size[0] * in_h / in_w
        else:
            size[0] = size[1] * in_w / in_h
        left, top = center - size / 2
        crop = Image.fromarray(bgr).transform((in_w, in_h), Image.AFFINE,
                                              (size[0] / in_w, 0, left, 0, size[1] / in_h, top), Image.BILINEAR)
        tensor = ((np.asarray(crop, dtype=np.float32) - _MEAN) / _STD).transpose(2, 0, 1)[None]
        simcc_x, simcc_y = self.estimator.run(None, {self.estimator.get_inputs()[0].name: tensor})
        locations, confidence = decode_simcc(simcc_x[0], simcc_y[0])
        return locations / [in_w, in_h] * size + [left, top], confidence

