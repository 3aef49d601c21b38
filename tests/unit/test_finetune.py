"""finetune: the assistant-only loss, padding, windows and drops, LoRA's merge, third-party bases, refusals, resume.

Whole runs fine-tune the tiny base of tests/helpers/projects.py (or a tiny `transformers` Llama folder) on
conversations tests/helpers/chat.py writes; each test gets its own MLflow SQLite store.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

from model import GPT, GPTConfig, load_pretrained
from model.chat import IM_END, encode_chat, literal
from pipelines.common.layout import Layout
from pipelines.common.params import FinetuneParams, LoraParams, ParamsError, load_params, parse_params
from pipelines.common.training import checkpoints as ckpt
from pipelines.common.training.lit import Optimization
from pipelines.finetune import lora
from pipelines.finetune.base import BaseModelError, check_config
from pipelines.finetune.data import IGNORE, Encoded, collate, encode_conversation, pad_id, sample_indices
from pipelines.finetune.lit_chat import LitChat
from pipelines.finetune.stage import finetune, main
from tests.helpers.chat import TINY_FINETUNE, llama_folder, write_chats, write_params
from tests.helpers.paths import REPO, run_module
from tests.helpers.projects import make_project
from tests.helpers.tokenizers import byte_bpe

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who is there?"},
    {"role": "assistant", "content": "Nay, answer me."},
    {"role": "user", "content": "Long live the king!"},
    {"role": "assistant", "content": "Bernardo?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return literal(byte_bpe(["Who is there? Nay, answer me: stand, and unfold yourself. Long live the king!"] * 8))


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


# --- masking, padding, windows ------------------------------------------------------------------


def test_only_the_assistants_tokens_and_its_im_end_are_targets(tokenizer):
    tally = Encoded()
    encode_conversation(tokenizer, CHAT, 256, tally)
    [window] = tally.windows
    targets = [t for t in window.targets if t != IGNORE]
    # a user or system token in the loss adds its text; an <|im_end|> left out loses the model its stop
    assert tokenizer.decode(targets, skip_special_tokens=False) == f"Nay, answer me.{IM_END}Bernardo?{IM_END}"
    im_end = tokenizer.token_to_id(IM_END)
    assert targets.count(im_end) == 2
    # targets are the next tokens of the inputs, and the window stops at the last one learnt
    full = encode_chat(tokenizer, CHAT, add_generation_prompt=False).ids
    assert window.inputs == full[: len(window.inputs)] and window.targets[-1] == im_end


def test_the_loss_averages_over_the_targets_alone(tokenizer):
    tally = Encoded()
    for messages in (CHAT, CHAT[1:3]):
        encode_conversation(tokenizer, messages, 256, tally)
    x, y = collate(tally.windows, pad=0)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=256))
    lit = LitChat(model, Optimization(lr=1e-3, min_lr=1e-4, warmup_steps=1, weight_decay=0.0), 10, wrapped=False)
    loss = lit.batch_loss((x, y))
    logits, _ = model(x)
    kept = y != IGNORE
    manual = torch.nn.functional.cross_entropy(logits[kept], y[kept])
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    # changing what the user said (an input, never a target) changes no target
    assert int(kept.sum()) == sum(t != IGNORE for w in tally.windows for t in w.targets)


def test_padding_is_never_im_end_nor_a_target_and_changes_no_logit(tokenizer):
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    pad = pad_id(tokenizer, pad_token=IM_END)  # a base whose own pad token is <|im_end|> (SmolLM2's)
    assert pad not in (vocab[IM_END], vocab["<|im_start|>"])
    tally = Encoded()
    for messages in (CHAT[1:3], CHAT):
        encode_conversation(tokenizer, messages, 256, tally)
    short = tally.windows[0]
    x, y = collate(tally.windows, pad)
    n = len(short.inputs)
    assert (x[0, n:] == pad).all() and (y[0, n:] == IGNORE).all() and n < x.shape[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size(), block_size=256)).eval()
    with torch.no_grad():
        padded, _ = model(x)
        alone, _ = model(torch.tensor([short.inputs]))
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=0)


def test_long_conversations_become_windows_and_what_cannot_fit_is_counted(tokenizer):
    tally = Encoded()
    long_chat = CHAT[:1] + CHAT[1:5] * 6  # twelve exchanges after a system prompt
    encode_conversation(tokenizer, long_chat, 64, tally)
    assert len(tally.windows) > 1 and tally.split_conversations == 1
    system = encode_chat(tokenizer, CHAT[:1], add_generation_prompt=False).ids
    for w in tally.windows:
        assert len(w.inputs) <= 64 and w.inputs[: len(system)] == system  # every window keeps the system prompt
    exchanges = sum(t == tokenizer.token_to_id(IM_END) for w in tally.windows for t in w.targets)
    assert exchanges == 12  # no exchange lost or repeated
    encode_conversation(tokenizer, [CHAT[1], {"role": "assistant", "content": "word " * 200}], 64, tally)
    encode_conversation(tokenizer, [CHAT[1], CHAT[3]], 64, tally)  # nobody answers: nothing to learn
    summary = tally.summary()
    assert summary["dropped"] == {"too_long": 1, "empty_mask": 1}
    assert summary["conversations"] == 3 and summary["windows"] == len(tally.windows)


def test_batches_are_a_pure_function_of_the_micro_batch_and_cover_each_epoch():
    first = [i for k in range(5) for i in sample_indices(20, 4, seed=3, k=k)]
    assert sorted(first) == list(range(20))  # one epoch: every window once
    assert sample_indices(20, 4, 3, 7) == sample_indices(20, 4, 3, 7) != sample_indices(20, 4, 4, 7)


# --- LoRA --------------------------------------------------------------------------------------------


def test_the_merged_model_gives_the_adapter_models_logits(tmp_path):
    torch.manual_seed(0)
    base = GPT(GPTConfig.from_preset("tiny", vocab_size=300))
    wrapped = lora.wrap(base, LoraParams(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)  # B starts at zero: make the adapter do something
    x = torch.randint(0, 300, (2, 24))
    wrapped.eval()
    with torch.enable_grad():  # peft's layers run on the training path (lit_chat.py)
        adapted = wrapped(x)[0].detach()
    lora.save_adapter(wrapped, tmp_path / "adapter", "artifacts/model")
    merged = lora.merge(wrapped)
    assert type(merged) is GPT and not any("lora" in n for n in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x)[0], adapted, atol=1e-5, rtol=0)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= set(lora.ADAPTER_FILES)
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "artifacts/model"


# --- bases -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attention_bias", True),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        ("model_type", "mistral"),
        ("hidden_act", "gelu"),
    ],
)
def test_a_config_quill_cannot_represent_is_refused_naming_the_field(field, value):
    cfg = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        field: value,
    }
    with pytest.raises(BaseModelError) as err:
        check_config(cfg, "finetune.base some/folder")
    assert f"'{field}'" in str(err.value) and "\n" not in str(err.value)


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


# --- whole runs ----------------------------------------------------------------------------------


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
    assert "chat_template" in json.loads((root / "artifacts/chat_model/tokenizer_config.json").read_text())
    assert (root / "mlflow.db").is_file()  # --root's own store


# --- params and wiring -------------------------------------------------------------------------------


def test_a_misspelled_finetune_key_fails_naming_it():
    raw = {"data": {"sources": [{"type": "local", "path": "c"}]}, "finetune": {"sources": [], "lora": {"rnak": 4}}}
    with pytest.raises(ParamsError, match=r"finetune\.lora\.rnak.*did you mean 'rank'"):
        parse_params(raw)


def test_dvc_stage_lists_exactly_the_finetune_training_keys():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["finetune"]
    keys = {p.removeprefix("finetune.") for p in stage["params"]}
    assert keys == set(FinetuneParams.model_fields) - {"sources", "split"}  # those are chat_data's
    outs = {next(iter(o)) if isinstance(o, dict) else o: o for o in stage["outs"]}
    assert outs["checkpoints_finetune"]["checkpoints_finetune"]["persist"] is True
    assert TINY_FINETUNE["max_steps"] < FinetuneParams.model_fields["max_steps"].default
