"""Evaluation protocols (SAM COCO mIoU, ImageNet top-1, throughput, label-free fidelity) and the
metrics they accumulate."""

from spatialmerge.evaluators.fidelity import FidelityEvaluator, fidelity_map
from spatialmerge.evaluators.metrics import Accuracy, MeanIoU, mask_iou, topk_correct
from spatialmerge.evaluators.miou import MIoUEvaluator
from spatialmerge.evaluators.throughput import ThroughputEvaluator
from spatialmerge.evaluators.top1 import Top1Evaluator

__all__ = [
    "Accuracy",
    "FidelityEvaluator",
    "MIoUEvaluator",
    "MeanIoU",
    "ThroughputEvaluator",
    "Top1Evaluator",
    "fidelity_map",
    "mask_iou",
    "topk_correct",
]
