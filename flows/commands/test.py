"""`imagenet test --model=NET --weights=W --iterations=N [--gpu=...]`: Caffe's `caffe test`
(tools/caffe.cpp test()): runs the TEST-phase net over N batches and prints every output
averaged over them (loss, accuracy, accuracy_top5 ...). The logic lives in model.train.evaluate.
"""
from __future__ import annotations

import argparse

from data.errors import ImagenetError
from flows.commands.train import parse_gpu, report_conv_plan_measuring
from flows.flags import add_flag, int_at_least
from model.train import evaluate

# caffe.cpp: DEFINE_int32(iterations, 50, ...)
DEFAULT_ITERATIONS = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "model", help="the model definition protocol buffer text file")
    add_flag(parser, "weights", help="the pretrained weights (comma-separated caffemodels)")
    add_flag(parser, "iterations", type=int_at_least(1), default=DEFAULT_ITERATIONS,
             help="the number of batches to run")
    add_flag(parser, "gpu", help="optional; devices to use ('all', '0,1', -1 for the CPU)")


def run(args: argparse.Namespace) -> int:
    if not args.model:
        raise ImagenetError("Need a model definition to score (--model=train_val.prototxt)")
    if not args.weights:
        raise ImagenetError("Need model weights to score (--weights=model.caffemodel)")
    report_conv_plan_measuring()
    evaluate(args.model, args.weights, args.iterations, devices=parse_gpu(args.gpu))
    return 0
