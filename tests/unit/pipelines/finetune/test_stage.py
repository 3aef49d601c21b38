"""pipelines/finetune/stage.py: the finetune stage on tiny bases (quill's and a transformers-written Llama folder), resumed, refused; its params and dvc.yaml entry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from model import Engine, SamplingParams, load_pretrained
from model.chat import encode_chat, literal
from pipelines.common.layout import Layout
from pipelines.common.params import FinetuneParams, ParamsError, load_params, parse_params
from pipelines.common.training import checkpoints as ckpt
from pipelines.finetune.stage import finetune, main
from tests.helpers.chat import CHAT, TINY_FINETUNE, llama_folder, write_chats, write_params
from tests.helpers.paths import REPO, run_module
from tests.helpers.projects import make_project


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project: data/tokenizer, a random tiny base in artifacts/model (its training run recorded), data/chat."""
    root = make_project(tmp_path_factory.mktemp("finetune-project"))
    (root / "artifacts/model/quill_run.json").write_text(json.dumps({"mlflow_run_id": "base-run-0"}))
    write_chats(root / "data/chat")
    return root


@pytest.fixture
def work(tmp_path: Path, project: Path, mlflow_uri: str) -> tuple[Path, str]:
    """A copy of the tiny project to fine-tune in, and a fresh MLflow store."""
    shutil.copytree(project / "data", tmp_path / "data")
    shutil.copytree(project / "artifacts", tmp_path / "artifacts")
    return tmp_path, mlflow_uri


def run(root: Path, uri: str, **knobs) -> dict:
    write_params(root, **knobs)
    return finetune(load_params(root / "params.yaml"), Layout().under(root), tracking_uri=uri)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(folder).state_dict()


def test_an_unsupported_base_stops_the_stage_in_one_line_before_any_work(work, capsys):
    root, _ = work
    folder = root / "biased"
    llama_folder(folder, attention_bias=True)
    write_params(root, base=str(folder))
    capsys.readouterr()  # transformers' own lines while writing the folder
    assert main(["--root", str(root)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("finetune: error: finetune.base") and "'attention_bias'" in line
    assert not (root / "checkpoints_finetune").exists() and not (root / "artifacts/chat_model").exists()


def test_a_third_party_llama_folder_is_fine_tuned_and_exported_as_a_plain_folder(work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, uri = work
    base = llama_folder(root / "llama")
    metrics = run(root, uri, base=str(base), max_steps=4, val_every=2)
    assert metrics["steps"] == 4 and metrics["max_length"] == 64
    out = Layout().under(root)
    x = torch.randint(0, 300, (1, 20))
    ours = load_pretrained(out.chat_model)
    theirs = AutoModelForCausalLM.from_pretrained(out.chat_model).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=0)
        # the adapter alone, on the base as transformers loads it, gives the same model
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out.chat_adapter).eval()
        torch.testing.assert_close(adapted(x).logits, theirs(x).logits, atol=1e-4, rtol=0)
    # the base's own tokenizer, with the ChatML template the model was fine-tuned on
    hf = AutoTokenizer.from_pretrained(out.chat_model)
    ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == encode_chat(literal(Tokenizer.from_file(str(base / "tokenizer.json"))), CHAT).ids
    # and what the server runs on it: the engine's chat prompt, a reply that ends its turn at <|im_end|>
    engine = Engine.from_pretrained(out.chat_model)
    assert engine.encode_chat(CHAT) == list(ids)
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    short = engine.encode_chat(CHAT[-2:-1])  # the last user turn alone: the tiny base's context is 64 tokens
    [reply] = engine.generate([short], SamplingParams(max_tokens=8, temperature=0.0, logit_bias={im_end: 100}))
    assert reply.finish_reason == "stop" and reply.token_ids == [im_end]


def test_a_base_without_chat_markers_gets_them_added_and_trained(work):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, uri = work
    base = llama_folder(root / "no-markers", markers=False)  # as TinyLlama's tokenizer: no <|im_start|>, <|im_end|>
    n = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    run(root, uri, base=str(base), max_steps=4, val_every=2)
    out = Layout().under(root)
    hf = AutoTokenizer.from_pretrained(out.chat_model)
    markers = hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert markers == [n, n + 1]  # added after the base's vocabulary, as special tokens
    ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(ids) == encode_chat(literal(Tokenizer.from_file(str(out.chat_model / "tokenizer.json"))), CHAT).ids
    assert list(ids).count(n) == len(CHAT) + 1
    ours, theirs = load_pretrained(out.chat_model), AutoModelForCausalLM.from_pretrained(out.chat_model).eval()
    assert ours.config.vocab_size == n + 2
    x = torch.tensor([[n, 5, 6, 7, n + 1, 9, n, 12, 13]])
    # LoRA left the base's rows alone and trained the markers' rows, which started as the mean of the others
    llama = AutoModelForCausalLM.from_pretrained(base).eval()
    embed, head = ours.model.embed_tokens.weight, ours.lm_head.weight
    torch.testing.assert_close(embed[:n], llama.model.embed_tokens.weight, rtol=0, atol=0)
    for rows, original in ((embed, llama.model.embed_tokens.weight), (head, llama.lm_head.weight)):
        assert not torch.allclose(rows[n:], original.mean(0).expand(2, -1), atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, ours(x)[0], atol=1e-4, rtol=0)
        # the adapter on the base as transformers users grow it (its trained rows replace the new ones)
        llama.resize_token_embeddings(n + 2)
        adapted = PeftModel.from_pretrained(llama, out.chat_adapter).eval()
        torch.testing.assert_close(adapted(x).logits, theirs(x).logits, atol=1e-4, rtol=0)


def test_full_fine_tuning_lowers_the_loss_and_links_the_mlflow_run_to_its_base(work):
    from mlflow import MlflowClient

    root, uri = work
    metrics = run(root, uri, method="full", max_steps=16, lr=3e-3, val_every=8)
    out = Layout().under(root)
    assert metrics["trainable_params"] == metrics["params"] and metrics["data"]["train"]["windows"] > 0
    assert (out.chat_adapter / "README.md").is_file() and not (out.chat_adapter / "adapter_config.json").exists()
    rows = list(csv_rows(out.finetune_plots / "train.csv"))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    saved = json.loads(out.finetune_metrics.read_text())
    assert saved["steps"] == 16 and saved["val_loss"] == pytest.approx(metrics["val_loss"])
    run_id = json.loads((out.chat_model / "quill_run.json").read_text())["mlflow_run_id"]
    mlrun = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.data.tags["quill.base_run_id"] == "base-run-0"
    assert mlrun.data.tags["quill.stage"] == "finetune" and "val_loss" in mlrun.data.metrics


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


def test_a_killed_run_resumes_to_the_same_weights(work):
    root, uri = work
    first = run(root, uri)
    out = Layout().under(root)
    reference = weights(out.chat_model)
    adapter = (out.chat_adapter / "adapter_model.safetensors").read_bytes()
    [folder] = [p for p in out.finetune_checkpoints.iterdir() if p.is_dir()]
    assert [step for step, _ in ckpt.list_checkpoints(folder)] == [12, 8]  # the newest two
    (folder / "step-00000012.ckpt").unlink()  # as if killed after step 8's checkpoint
    shutil.rmtree(out.chat_model)
    resumed = run(root, uri)
    assert first["resumed_from_step"] == 0 and resumed["resumed_from_step"] == 8 and resumed["steps"] == 12
    again = weights(out.chat_model)
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert (out.chat_adapter / "adapter_model.safetensors").read_bytes() == adapter
    assert resumed["train_loss"] == pytest.approx(first["train_loss"], abs=1e-6)


def test_the_cli_runs_on_another_root(work):
    root, _ = work
    write_params(root, max_steps=4, val_every=4)
    result = run_module("pipelines.finetune", REPO, "--root", str(root), env={"MLFLOW_TRACKING_URI": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1].removeprefix("finetune: "))
    assert summary["steps"] == 4 and summary["trainable_params"] < summary["params"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "quill_run.json"):
        assert (root / "artifacts/chat_model" / name).is_file()
    # LoRA is merged into the weights it adapted: the exported model has the base's parameters, no more
    base, chat = (load_pretrained(root / "artifacts" / m).num_params() for m in ("model", "chat_model"))
    metrics = json.loads((root / "metrics/finetune.json").read_text())
    assert metrics["params"] == base == chat
    assert "chat_template" in json.loads((root / "artifacts/chat_model/tokenizer_config.json").read_text())
    assert (root / "mlflow.db").is_file()  # --root's own store


def test_a_misspelled_finetune_key_fails_naming_it():
    raw = {"data": {"sources": [{"type": "local", "path": "c"}]}, "finetune": {"sources": [], "lora": {"rnak": 4}}}
    with pytest.raises(ParamsError, match=r"finetune\.lora\.rnak.*did you mean 'rank'"):
        parse_params(raw)


def test_dvc_stage_lists_exactly_the_finetune_training_keys():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    keys = {p.removeprefix("finetune.") for p in stage["params"]}
    assert keys == set(FinetuneParams.model_fields) - {"sources", "split", "eval"}  # chat_data's and chat_eval's
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in stage["outs"]}
    assert outs["checkpoints_finetune"]["checkpoints_finetune"]["persist"] is True
    assert TINY_FINETUNE["max_steps"] < FinetuneParams.model_fields["max_steps"].default
