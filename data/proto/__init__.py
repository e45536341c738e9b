"""The project's Caffe schema (caffe.proto) and its generated module caffe_pb2.

`from data.proto import caffe_pb2` gives Datum, BlobProto, NetParameter, SolverParameter, ...
"""
