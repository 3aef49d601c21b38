"""flows/models.py: what the small registry flows accept from a run's parameters."""

from __future__ import annotations

import pytest

from flows.models import registry_uri


@pytest.mark.parametrize(
    ("model", "uri"),
    [
        ("3", "models:/quill-gpt/3"),
        ("champion", "models:/quill-gpt@champion"),
        ("models:/quill-gpt/2", "models:/quill-gpt/2"),
        ("models:/quill-gpt@challenger", "models:/quill-gpt@challenger"),
    ],
)
def test_serve_model_serves_versions_of_the_configured_model(model, uri):
    assert registry_uri(model, "quill-gpt") == uri


@pytest.mark.parametrize("model", ["/etc", "artifacts/model", "models:/other-model/1", "runs:/abc/model", "../x"])
def test_serve_model_refuses_folders_and_other_models(model):
    with pytest.raises(ValueError, match="serves versions of the registered model 'quill-gpt' only"):
        registry_uri(model, "quill-gpt")
