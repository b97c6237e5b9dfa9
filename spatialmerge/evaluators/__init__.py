"""Evaluation protocols (SAM COCO mIoU, ImageNet top-1) and the metrics they accumulate."""

from spatialmerge.evaluators.metrics import Accuracy, MeanIoU, mask_iou, topk_correct
from spatialmerge.evaluators.miou import MIoUEvaluator
from spatialmerge.evaluators.throughput import ThroughputEvaluator
from spatialmerge.evaluators.top1 import Top1Evaluator

__all__ = [
    "Accuracy",
    "MIoUEvaluator",
    "MeanIoU",
    "ThroughputEvaluator",
    "Top1Evaluator",
    "mask_iou",
    "topk_correct",
]
