"""The `imagenet` flow's parameters are top-level and exactly PipelineParams' fields (so a
deployment's presets combine with `--param NAME=VALUE`), each described in the UI's form."""
from __future__ import annotations

import inspect

from flows.imagenet import PipelineParams, imagenet


def test_flow_parameters_are_the_pipeline_params_fields():
    signature = inspect.signature(imagenet.fn)
    assert list(signature.parameters) == list(PipelineParams.model_fields)
    defaults = PipelineParams()
    for name, parameter in signature.parameters.items():
        assert parameter.default == getattr(defaults, name), name


def test_every_parameter_is_described_in_the_ui_form():
    schema = imagenet.parameters.model_dump()
    assert set(schema["properties"]) == set(PipelineParams.model_fields)
    for name, prop in schema["properties"].items():
        assert prop.get("description"), name
    stages = schema["properties"]["stages"]["items"]
    assert stages["enum"] == ["download", "extract", "listings", "convert", "mean", "train",
                              "evaluate"]
