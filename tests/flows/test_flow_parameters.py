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


def test_deployment_parameters_are_checked_by_type_like_the_command_line():
    """The Prefect API checks a deployment run's parameters against the flow's JSON schema
    (enforce_parameter_schema), where JSON's true is no integer and "5" no count: the same
    values PipelineParams refuses for `imagenet pipeline`."""
    import jsonschema
    import pytest
    from pydantic import ValidationError

    schema = imagenet.parameters.model_dump()
    for bad in ({"workers": True}, {"sources": 3}, {"sources": "nonsense"}, {"max_iter": "5"},
                {"devices": [True]}, {"stages": "convert"}, {"encoded": "yes"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ValidationError):
            PipelineParams.model_validate(bad)
    jsonschema.validate({"workers": 2, "sources": {"train": "mini"}, "devices": [0]}, schema)


def test_choice_types_list_the_libraries_registries():
    """The UI's choices for resize_mode and net are data.images' modes and the zoo's recipes."""
    from typing import get_args

    from data.images import RESIZE_MODES
    from flows.imagenet import NetName, ResizeMode
    from model.zoo.recipes import RECIPES

    assert get_args(ResizeMode) == RESIZE_MODES
    assert list(get_args(NetName)) == list(RECIPES)
