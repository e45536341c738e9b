"""One module per `imagenet` subcommand.

Each module defines `add_arguments(parser)` and `run(args) -> int` and calls the data/ and
model/ libraries directly (the pipeline command goes through the Prefect flow). The table below
is the single list of commands; modules are imported only when their command runs, so
`imagenet --help` stays fast.
"""
from __future__ import annotations

# name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert-imageset": ("flows.commands.convert_imageset",
                         "convert a folder of images + listing into an LMDB of Caffe Datums"),
    "compute-image-mean": ("flows.commands.compute_image_mean",
                           "compute mean.binaryproto over an LMDB of Datums"),
    "train": ("flows.commands.train", "train a net from a Caffe solver.prototxt"),
    "test": ("flows.commands.test", "score a trained model on its TEST-phase data"),
    "time": ("flows.commands.time", "time forward/backward passes of a net"),
    "classify": ("flows.commands.classify",
                 "top-k classes of images with a trained net (ten-crop, as Caffe's classifier)"),
    "fetch": ("flows.commands.fetch",
              "download, verify and extract ILSVRC12 and write Caffe's listings"),
    "download": ("flows.commands.download", "download one archive with resume and checksum"),
    "extract": ("flows.commands.extract", "safely extract one ILSVRC12 archive"),
    "make-mini-ilsvrc12": ("flows.commands.make_mini_ilsvrc12",
                           "write a small dataset with exactly ILSVRC2012's shape"),
    "make-image-folder": ("flows.commands.make_image_folder",
                          "write a folder of class folders of generated photos (an example "
                          "for pipeline --images)"),
    "pipeline": ("flows.commands.pipeline", "run the full Prefect pipeline from the terminal"),
}
