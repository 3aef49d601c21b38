"""Names that several parts of quill (stages, the server, flows) must agree on: model-folder and registry layout."""

from __future__ import annotations

# A registered model version is an MLflow pyfunc model whose Hugging Face folder is the artifact `hf_model`.
HF_ARTIFACT = "hf_model"  # the artifacts key (log_model(artifacts={HF_ARTIFACT: folder}))
HF_MODEL_PATH = "artifacts/hf_model"  # where that folder lies inside a downloaded registered model

# Registry aliases: `champion` is what serving deploys (models:/<name>@champion), `challenger` the newest version
# registered but not promoted.
CHAMPION, CHALLENGER = "champion", "challenger"

# The evaluate stage's headline metrics (metrics/eval.json): register tags each version with them (and every
# task's 0-shot scores), the flows put them before a reviewer.
HEADLINE_METRICS = ("test_bpb", "test_loss", "test_ppl")


class Tag:
    """Tag names on every registered version: register writes them; serving, the flows and the next registration
    read them (with HEADLINE_METRICS and every task's 0-shot score, which are tags of their own name)."""

    TOKENIZER = "tokenizer_sha256"  # serving refuses a model whose tokenizer differs
    TEST_DATA = "test_data_sha256"  # with the two below: how test_bpb was measured (register compares them)
    STRIDE = "test_window_stride"
    SCORER = "test_scorer"
    TRAINING_RUN = "training_run_id"
    REGISTRATION_KEY = "registration_key"  # finds the version a killed registration created
    DECISION = "decision"  # the promotion decision, JSON, written before the aliases move
    DVC_HASH = "dvc_hash."  # + a data path: the input's hash
