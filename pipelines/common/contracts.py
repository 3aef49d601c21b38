"""Names that several parts of quill (stages, the server, flows) must agree on: model-folder and registry layout."""

from __future__ import annotations

# A registered model version is an MLflow pyfunc model whose Hugging Face folder is the artifact `hf_model`.
HF_ARTIFACT = "hf_model"  # the artifacts key (log_model(artifacts={HF_ARTIFACT: folder}))
HF_MODEL_PATH = "artifacts/hf_model"  # where that folder lies inside a downloaded registered model
