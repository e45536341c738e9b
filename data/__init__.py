"""Data stage library: Caffe's record formats, LMDB I/O, image decoding, ILSVRC12, input pipeline.

Never imports Prefect: tasks/ wraps this package.
"""
