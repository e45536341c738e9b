"""`imagenet classify --weights=X.caffemodel [--model=deploy.prototxt] [--mean=mean.binaryproto |
--mean_value=B,G,R] [--labels=synset_words.txt] [--top_k=5] [--center_only] [--json]
IMAGE|FOLDER|LISTING.txt ...`: Caffe's classification example (python/classify.py with
python/caffe/classifier.py; the top-k printout of examples/cpp_classification).

Weights trained here carry an inference bundle beside them (model/bundle.py: the deploy net,
image size, crop, mean, input scale and class names), so `--weights` alone answers right; every
flag given wins over the bundle. A bare Caffe .caffemodel needs --model and the preprocessing
flags, as with Caffe.

Each image is resized to the mean's size (256x256 without a mean file), ten crops of the net's
input size (corners, centre and their mirror images) are scored and averaged unless
--center_only; pixels are BGR 0..255 scaled by --raw_scale/255, minus the mean, times
--input_scale (the transform_param scale the net was trained with). The logic lives in
model/classify.py.

Inputs: image files; folders (their image files, recursively, in sorted order); listings
(`.txt`: `<path>[ <label>]` per line, paths relative to --root_folder). When every listed image
has a label, the closing line gives top-1 and top-k accuracy. Images that cannot be decoded are
reported one per line and counted; the exit status is 1 only when none could be classified.
Output: per image its top-k as `0.8123 - "n01440764 tench, Tinca tinca"`, or with --json one
JSON object per line ({"image", "top_k": [{"index", "label", "score"}]} or {"image", "error"}).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from data.errors import ImagenetError
from data.images import RESIZE_MODES
from data.textlines import read_caffe_lines
from flows.flags import add_flag

DEFAULT_TOP_K = 5
DEFAULT_BATCH_IMAGES = 4
LISTING_SUFFIX = ".txt"
# Files a folder contributes (OpenCV decodes these; others are not looked at).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm",
                            ".tif", ".tiff", ".webp", ".jpe", ".jp2"})
PROB_FORMAT = "{:.4f}"


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _dims(text: str) -> tuple[int, int]:
    try:
        h, w = (int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 256,256), got {text!r}")
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return h, w


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE",
                        help="image files, folders of images, or .txt listings")
    add_flag(parser, "model", help="the deploy net prototxt (one input blob); default: the "
             "one in the weights' inference bundle")
    add_flag(parser, "weights", required=True, help="the trained .caffemodel (its inference "
             "bundle, written beside it by training, supplies the flags not given)")
    add_flag(parser, "mean", help="mean.binaryproto (or .npy); images are resized to its size")
    add_flag(parser, "mean_value", type=_floats, help="per-channel mean instead: B,G,R")
    add_flag(parser, "labels", help="class names, line i = class i (synset_words.txt)")
    add_flag(parser, "top_k", type=int, default=DEFAULT_TOP_K,
             help=f"classes shown per image (default {DEFAULT_TOP_K})")
    add_flag(parser, "center_only", type=bool, default=False,
             help="score the centre crop only, not the ten oversampled crops")
    add_flag(parser, "resize_mode", default=None, choices=RESIZE_MODES,
             help="how images reach the records' size, as convert-imageset --resize_mode "
             "(default: the bundle's, else squash)")
    add_flag(parser, "images_dim", type=_dims, default=None,
             help="resize images to H,W before cropping (default: the bundle's training size, "
             "else the mean's size, else 256,256)")
    add_flag(parser, "raw_scale", type=float, default=None,
             help="pixels are scaled to [0, raw_scale] before the mean (default: the bundle's, "
             "else 255)")
    add_flag(parser, "input_scale", type=float, default=None,
             help="multiply after subtracting the mean (the net's transform_param scale; "
             "default: the bundle's, else 1)")
    add_flag(parser, "root_folder", default="", help="prefix of the paths in listings")
    add_flag(parser, "batch_size", type=int, default=DEFAULT_BATCH_IMAGES,
             help=f"images per forward pass (default {DEFAULT_BATCH_IMAGES})")
    add_flag(parser, "gpu", default=None,
             help="device: an id, or -1 for the CPU (default: JAX's default device)")
    add_flag(parser, "json", type=bool, default=False, help="one JSON object per image")


def expand_inputs(inputs: list[str], root_folder: str
                  ) -> tuple[list[str], dict[str, int], list[tuple[str, str]]]:
    """(image paths in order, labels from listings, (input, reason) for unusable inputs)."""
    paths: list[str] = []
    labels: dict[str, int] = {}
    bad: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                bad.append((item, "folder holds no image files"))
            paths.extend(found)
        elif p.suffix.lower() == LISTING_SUFFIX and p.is_file():
            paths.extend(_listing(p, root_folder, labels))
        elif p.is_file():
            paths.append(item)
        else:
            bad.append((item, "no such file or folder"))
    return paths, labels, bad


def _listing(path: Path, root: str, labels: dict[str, int]) -> list[str]:
    """Listing lines `<path> <label>` (labels kept) or bare `<path>` lines."""
    # convert_imageset's parser, imported only for listings (it brings LMDB and multiprocessing)
    from data.convert import read_listing, resolve_listed as resolve

    text = read_caffe_lines(path, errors="surrogateescape")
    if all(len(line.rsplit(" ", 1)) == 2 and line.rsplit(" ", 1)[1].lstrip("-").isdigit()
           for line in text if line.strip()):
        out = []
        for entry in read_listing(path):
            f = resolve(root, entry.path)
            labels[f] = entry.label
            out.append(f)
        return out
    return [resolve(root, line.strip()) for line in text if line.strip()]


def _device(gpu: str | None):
    import jax

    if gpu is None:
        return None
    if gpu.strip() == "-1":
        return jax.devices("cpu")[0]
    try:
        return jax.devices()[int(gpu)]
    except (ValueError, IndexError):
        raise ImagenetError(f"--gpu={gpu}: valid: -1 (CPU) or 0..{len(jax.devices()) - 1} "
                            f"({', '.join(str(d) for d in jax.devices())})") from None


def run(args: argparse.Namespace) -> int:
    if not args.weights:
        raise ImagenetError("classify needs --weights=X.caffemodel (and --model=deploy.prototxt "
                            "when the weights have no inference bundle beside them)")
    if args.top_k < 1:
        raise ImagenetError(f"--top_k must be >= 1, got {args.top_k}")
    started = time.perf_counter()
    paths, listed_labels, bad = expand_inputs(args.inputs, args.root_folder)
    for item, reason in bad:
        print(f"imagenet classify: skipped {item}: {reason}", file=sys.stderr)
    if not paths:
        raise ImagenetError("no images to classify")
    from model.bundle import resolve_settings
    from model.classify import Classifier, read_labels, top_k

    settings = resolve_settings(args.weights, model=args.model, mean_file=args.mean,
                                mean_values=args.mean_value, raw_scale=args.raw_scale,
                                input_scale=args.input_scale, image_hw=args.images_dim,
                                labels=args.labels, resize_mode=args.resize_mode)
    names = read_labels(settings.labels) if settings.labels else None
    clf = Classifier(settings.model, args.weights, image_hw=settings.image_hw,
                     mean_file=settings.mean_file, mean_values=settings.mean_values,
                     raw_scale=settings.raw_scale, input_scale=settings.input_scale,
                     oversample=not args.center_only,
                     batch_images=min(args.batch_size, len(paths)), device=_device(args.gpu),
                     resize_mode=settings.resize_mode)
    if names is not None and len(names) != clf.num_outputs:
        raise ImagenetError(f"{settings.labels} has {len(names)} labels but {clf.output!r} has "
                            f"{clf.num_outputs} outputs (Caffe: 'Number of labels is different "
                            "from the output layer dimension')")
    ready = time.perf_counter()
    predictions, skipped = clf.predict(paths)
    k = min(args.top_k, clf.num_outputs)
    hits = {1: 0, k: 0}
    for pred in predictions:
        best = top_k(pred.scores, k)
        label = listed_labels.get(pred.image)
        if label is not None:
            ranked = [i for i, _ in best]
            hits[1] += ranked[:1] == [label]
            hits[k] += label in ranked
        if args.json:
            print(json.dumps({"image": pred.image, "top_k": [
                {"index": i, "label": names[i] if names else str(i), "score": s}
                for i, s in best]}))
        else:
            print(pred.image)
            for i, s in best:
                print(f"{PROB_FORMAT.format(s)} - \"{names[i] if names else i}\"")
    for path, reason in skipped:
        if args.json:
            print(json.dumps({"image": path, "error": reason}))
        print(f"imagenet classify: skipped {path}: {reason}", file=sys.stderr)
    total = time.perf_counter() - started
    summary = (f"classified {len(predictions)} of {len(paths)} images "
               f"({'centre crop' if args.center_only else '10 crops'} each, "
               f"{clf.output!r} of {Path(settings.model).name}"
               + (f", settings from {settings.bundle.name}" if settings.bundle else "")
               + f") in {total:.1f} s "
               f"(setup {ready - started:.1f} s, device {clf.device})")
    labelled = [p for p in predictions if p.image in listed_labels]
    if labelled and len(labelled) == len(predictions):
        summary += (f"; top-1 {hits[1]}/{len(labelled)}, top-{k} {hits[k]}/{len(labelled)} "
                    "of the listing's labels")
    if skipped or bad:
        summary += f"; skipped {len(skipped) + len(bad)}"
    print(summary, file=sys.stderr)
    if not predictions:  # nothing classified is a failure, said in the one error line
        path, reason = (skipped or bad)[0]
        raise ImagenetError(f"none of the {len(paths)} images could be classified ({path}: "
                            f"{reason})")
    return 0


__all__ = ["add_arguments", "expand_inputs", "run"]
