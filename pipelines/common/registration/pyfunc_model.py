"""The MLflow pyfunc face of a quill model: prompts plus sampling parameters in, completions out.

Logged as "models from code" (this file is stored with the model, nothing is pickled); the model's
Hugging Face folder is its artifact `hf_model`, so loading works anywhere quill (the `model` package)
is installed:

    >>> m = mlflow.pyfunc.load_model("models:/quill-gpt@champion")
    >>> m.predict(["To be, or"], params={"max_tokens": 16, "temperature": 0.0})
    #    prompt     text        finish_reason  prompt_tokens  completion_tokens
    # 0  To be, or  " not to..."  length         4              16

A server that wants the folder itself (to run `model.Engine` directly):

    >>> path = mlflow.artifacts.download_artifacts("models:/quill-gpt@champion")  # the logged pyfunc model
    >>> engine = Engine.from_pretrained(Path(path) / HF_MODEL_PATH)               # <path>/artifacts/hf_model

Input (the signature's unnamed string column): a list of prompts, one string, {"prompt": [...]} or a
one-column DataFrame. Params (the signature's `params` schema, every one optional, defaults in PARAMS):
the per-request controls of `model.SamplingParams`; `stop` is one stop string ("" = none) and `seed` -1
means unseeded. Output: a DataFrame with OUTPUT_COLUMNS, one row per prompt. `predict` is typed with a
DataFrame, the form MLflow hands it under the signature; MLflow then neither warns that type hints are missing
nor validates the input against them (it does against the signature).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd  # mlflow.pyfunc imports it anyway; predict's type hints name it
from mlflow.pyfunc import PythonModel

from pipelines.common.contracts import HF_ARTIFACT, HF_MODEL_PATH  # noqa: F401  (part of this module's face)

# Sampling parameters accepted per request, with their defaults (the signature's params schema).
PARAMS = {
    "max_tokens": 64,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "stop": "",
    "seed": -1,
}
OUTPUT_COLUMNS = ["prompt", "text", "finish_reason", "prompt_tokens", "completion_tokens"]


def sampling_params(params: dict | None):
    """The request's params (unknown names are refused) as model.SamplingParams."""
    # this file is stored with each registered model and imported by MLflow at load: torch (via model) is
    # imported when a model is used, not when MLflow merely reads the file
    from model import SamplingParams

    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown sampling parameter(s) {unknown}; known: {sorted(PARAMS)}")
    merged = {**PARAMS, **params}
    merged["stop"] = [merged["stop"]] if merged["stop"] else None
    merged["seed"] = None if merged["seed"] is None or int(merged["seed"]) < 0 else int(merged["seed"])
    for k in ("max_tokens", "top_k"):
        merged[k] = int(merged[k])
    for k in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        merged[k] = float(merged[k])
    return SamplingParams(**merged)


def prompts_of(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("prompt")
        values = [values] if isinstance(values, str) else list(values)
    else:
        values = list(model_input)
    out = []  # {"prompt": [a, b]} arrives as one row holding the list
    for v in values:
        out += [str(x) for x in v] if not isinstance(v, str) and hasattr(v, "__iter__") else [str(v)]
    return out


class QuillPyfunc(PythonModel):
    def load_context(self, context):
        from model import Engine  # lazily, as in sampling_params()

        self.engine = Engine.from_pretrained(context.artifacts[HF_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Completions of the prompts in `model_input` (a DataFrame, or a list, a string or {"prompt": [...]}
        when called directly)."""
        prompts = prompts_of(model_input)
        completions = self.engine.generate(prompts, sampling_params(params))
        return pd.DataFrame(
            [
                [prompts[c.index], c.text, c.finish_reason, len(c.prompt_token_ids), len(c.token_ids)]
                for c in completions
            ],
            columns=OUTPUT_COLUMNS,
        )


mlflow.models.set_model(QuillPyfunc())
