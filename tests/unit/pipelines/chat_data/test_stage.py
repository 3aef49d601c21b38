"""The chat_data stage: every source type on tiny data the tests write (fake wheels in a find-links folder stand in
for the package index), bad rows counted by reason, the stable split, the one-line CLI errors; one integration test
reads the real chitchat-dataset and chatterbot-corpus wheels from the index."""

from __future__ import annotations

import gzip
import json
import os
import random
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pipelines.chat_data.errors import ChatDataError
from pipelines.chat_data.stage import summarize
from pipelines.common.layout import PROJECT
from pipelines.common.params import ParamsError, load_params, parse_params
from pipelines.common.pypi import PypiError
from tests.helpers.paths import REPO, run_module


@pytest.fixture(autouse=True)
def setuptools_importable_after_pip():
    """pypi_wheel sources read pip's configuration with pip's own parser in this process (pipelines/common/pypi.py),
    which turns setuptools' distutils shim off for the rest of the process (the same fixture as test_ingest's: a
    later `import setuptools`, as torch.compile does, would fail). Turn the shim back on after each test."""
    yield
    finder = getattr(sys.modules.get("_distutils_hack"), "DISTUTILS_FINDER", None)
    if finder is not None:
        vars(finder).pop("spec_for_distutils", None)


# --- helpers ---------------------------------------------------------------------------------------------------


def chat_data(root: Path, sources: list[dict], **split: float) -> dict:
    """Run the stage in-process on a project at `root` whose params.yaml declares these chat sources; its metrics."""
    params = {"data": {"sources": [{"type": "local", "path": "corpus"}]}, "finetune": {"sources": sources}}
    if split:
        params["finetune"]["split"] = split
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summarize(load_params(root / "params.yaml"), PROJECT.under(root))
    return json.loads((root / "metrics/chat.json").read_text())


def rows(root: Path) -> dict[str, tuple[str, dict]]:
    """Every output row by id: (split, row)."""
    out = {}
    for split in ("train", "val", "test"):
        for line in (root / "data/chat" / f"{split}.jsonl").read_text().splitlines():
            row = json.loads(line)
            out[row["id"]] = (split, row)
    return out


def messages(root: Path) -> list[list[dict]]:
    """The kept conversations' messages, in output order within each split, splits concatenated."""
    return [row["messages"] for _, row in rows(root).values()]


def write_jsonl(path: Path, records: list) -> Path:
    """Rows as JSON lines; a str or bytes record is written as it is (a line that is not JSON, or not UTF-8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in records]
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def chat(*pairs: str) -> dict:
    """{"messages": [...]} from alternating user/assistant contents."""
    return {"messages": [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(pairs)]}


# --- wheels: read from the archive, never installed ---------------------------------------------------------------

CHITCHAT = {
    "conv-a": {
        "messages": [
            [{"text": "Hello", "sender": "s1"}, {"text": "How are you doing today?", "sender": "s1"}],
            [{"text": "good, you?", "sender": "s2"}],
            [{"text": "Tired.", "sender": "s1"}],
        ],
        "prompt": "What's new?",
    },
    "conv-b": {"messages": [[{"text": "anyone there?", "sender": "s1"}]]},  # nobody answered
    "conv-c": {"messages": [[{"text": "hi", "sender": "s1"}], [{"text": "  ", "sender": "s2"}]]},  # empty turn
}
CHATTERBOT_EN = """categories:
- greetings
conversations:
- - Hello
  - Hi
- - Are you a robot?
  - yes
  - Really?
- 'A string, not a list - as in the real trivia.yml'
- - Hello
  - Hi
"""


def fake_wheel(links: Path, name: str, version: str, members: dict[str, str]) -> Path:
    """A wheel-shaped zip (name-version-py3-none-any.whl) holding `members`, in a find-links folder."""
    links.mkdir(parents=True, exist_ok=True)
    path = links / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in members.items():
            zf.writestr(member, text)
    return path


@pytest.fixture
def wheel_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A find-links folder with small chitchat-dataset and chatterbot-corpus wheels, and pip pointed only at it."""
    links = tmp_path / "links"
    fake_wheel(
        links,
        "chitchat-dataset",
        "0.9.0",
        {
            "chitchat_dataset/__init__.py": "raise SystemExit('imported')\n",
            "chitchat_dataset/dataset.json": json.dumps(CHITCHAT),
        },
    )
    fake_wheel(
        links,
        "chatterbot-corpus",
        "1.3.3",
        {
            "chatterbot_corpus/__init__.py": "raise SystemExit('imported')\n",
            "chatterbot_corpus/data/english/greetings.yml": CHATTERBOT_EN,
            "chatterbot_corpus/data/german/greetings.yml": "conversations:\n- - Hallo\n  - Hallo\n",
        },
    )
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


CHITCHAT_SOURCE = {
    "type": "pypi_wheel",
    "package": "chitchat-dataset",
    "version": "0.9.0",
    "include": ["chitchat_dataset/dataset.json"],
}
CHATTERBOT_SOURCE = {
    "type": "pypi_wheel",
    "package": "chatterbot-corpus",
    "version": "1.3.3",
    "include": ["chatterbot_corpus/data/english/*.yml"],
}


def test_wheel_data_files_are_read_from_the_archive(tmp_path: Path, wheel_index: Path):
    metrics = chat_data(tmp_path / "p", [CHITCHAT_SOURCE, CHATTERBOT_SOURCE])
    got = messages(tmp_path / "p")
    # chitchat: a speaker's messages make one turn; the last, unanswered turn is left out
    assert [
        {"role": "user", "content": "Hello\nHow are you doing today?"},
        {"role": "assistant", "content": "good, you?"},
    ] in got
    # chatterbot: every scalar a string (YAML 1.1 would make `yes` True); English only, as `include` says
    assert [{"role": "user", "content": "Are you a robot?"}, {"role": "assistant", "content": "yes"}] in got
    assert not any("Hallo" in m["content"] for conv in got for m in conv)
    assert metrics["sources"]["chitchat-dataset"] == {
        "source": "pypi_wheel:chitchat-dataset==0.9.0",
        "conversations_in": 3,
        "kept": 1,
        "capped": 0,
        "turns": 2,
        "chars": len("Hello\nHow are you doing today?good, you?"),
        "dropped": {"empty_content": 1, "no_assistant_turn": 1},
    }
    assert metrics["sources"]["chatterbot-corpus"]["dropped"] == {"duplicate": 1, "malformed": 1}
    assert metrics["conversations_out"] == 3
    ids = {row["source"] for _, row in rows(tmp_path / "p").values()}
    assert "pypi_wheel:chitchat-dataset==0.9.0:chitchat_dataset/dataset.json#conv-a" in ids
    # never installed nor imported (the packages' __init__ would exit), no download left behind
    assert "chitchat_dataset" not in sys.modules and "chatterbot_corpus" not in sys.modules
    assert not list((tmp_path / "p/data").glob(".chat-scratch-*"))


def test_a_wheel_that_is_not_on_the_index_fails_naming_it(tmp_path: Path, wheel_index: Path):
    with pytest.raises(PypiError, match=r"could not download the wheel chitchat-dataset==9\.9: no wheel of it in"):
        chat_data(tmp_path / "p", [{**CHITCHAT_SOURCE, "version": "9.9"}])
    with pytest.raises(ChatDataError, match=r"no file matches include=\['nothing/\*'\]"):
        chat_data(tmp_path / "q", [{**CHITCHAT_SOURCE, "include": ["nothing/*"]}])
    assert not (tmp_path / "p/data/chat").exists() and not (tmp_path / "q/metrics").exists()


@pytest.mark.integration
def test_the_default_wheels_from_the_package_index(tmp_path: Path):
    """The real wheels of params.yaml's default mix, downloaded from the index pip is configured with."""
    wheels = [s.model_dump() for s in load_params(REPO / "params.yaml").finetune.sources if s.type == "pypi_wheel"]
    metrics = chat_data(tmp_path, wheels)
    chitchat, chatterbot = metrics["sources"]["chitchat-dataset"], metrics["sources"]["chatterbot-corpus"]
    assert chitchat["conversations_in"] == 7168  # as the package describes it
    assert chitchat["dropped"]["no_assistant_turn"] == 3150  # one person waited, nobody came
    assert chitchat["kept"] > 3900 and chatterbot["kept"] > 800
    assert chatterbot["dropped"]["duplicate"] > 1000  # tech_support.yml repeats ten exchanges about a hundred times
    answer = (
        "Artificial Intelligence is the branch of engineering and science devoted to constructing machines that think."
    )
    assert [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": answer}] in messages(tmp_path)


# --- jsonl rows ------------------------------------------------------------------------------------------------


def test_jsonl_messages_and_prompt_completion_rows(tmp_path: Path):
    root = tmp_path / "p"
    system_row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  Hi?\n"},
            {"role": "assistant", "content": "Hello.", "name": "bot"},  # other keys are dropped
        ],
        "id": 7,
    }
    write_jsonl(root / "chats/a.jsonl", [system_row, {"prompt": "2+2?", "completion": " 4"}])
    write_jsonl(root / "chats/sub/b.jsonl.gz", [chat("Ça va ? 🙂", "Oui, 很好.")])
    write_jsonl(root / "chats/ignored.json", [chat("not", "read")])
    metrics = chat_data(root, [{"type": "jsonl", "path": "chats"}])
    assert sorted(messages(root), key=len) == [
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Ça va ? 🙂"}, {"role": "assistant", "content": "Oui, 很好."}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ],
    ]
    assert metrics["conversations_out"] == 3 and metrics["turns"] == 7 and metrics["dropped"] == {}
    sources = sorted(row["source"] for _, row in rows(root).values())
    assert sources == ["jsonl:chats:a.jsonl#L1", "jsonl:chats:a.jsonl#L2", "jsonl:chats:sub/b.jsonl.gz#L1"]
    # a single file as the source
    assert chat_data(tmp_path / "q", [{"type": "jsonl", "path": str(root / "chats/a.jsonl")}])["conversations_out"] == 2


BAD_ROWS = {
    "not_json": ['{"messages": [', b'{"prompt": "caf\xe9", "completion": "latin-1"}'],
    "malformed": [[1, 2], {"text": "no messages"}, {"messages": "hi"}, {"messages": [{"content": "no role"}]}],
    "unknown_role": [{"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    "empty_content": [chat("hi", "   "), chat("", "y"), {"prompt": "", "completion": "y"}],
    "no_assistant_turn": [{"messages": [{"role": "user", "content": "hello?"}]}, {"prompt": "alone"}],
    "duplicate": [chat("same", "row")],
}


def test_bad_rows_are_counted_by_reason_and_reported(tmp_path: Path):
    good = [chat("same", "row"), chat("fine", "too")]
    bad = [row for reason in BAD_ROWS.values() for row in reason]
    write_jsonl(tmp_path / "p/chats.jsonl", good + bad + ["", "   "])  # blank lines are not rows
    metrics = chat_data(tmp_path / "p", [{"type": "jsonl", "path": "chats.jsonl"}])
    assert metrics["dropped"] == {reason: len(rows) for reason, rows in BAD_ROWS.items()}
    assert metrics["conversations_in"] == len(good) + len(bad)
    assert metrics["conversations_in"] == metrics["conversations_out"] + sum(metrics["dropped"].values())
    report = (tmp_path / "p/reports/chat/report.md").read_text()
    assert "`unknown_role` `jsonl:chats.jsonl:chats.jsonl#L9`: message 1 has role 'bot'" in report
    assert "| `jsonl:chats.jsonl` | 15 | 2 | 0 | 4 | 14 |" in report


def test_nothing_usable_fails_after_the_report_and_keeps_the_old_outputs(tmp_path: Path):
    root = tmp_path / "p"
    write_jsonl(root / "chats.jsonl", [chat("a", "b")])
    chat_data(root, [{"type": "jsonl", "path": "chats.jsonl"}])
    before = rows(root)
    write_jsonl(root / "chats.jsonl", ["nope", {"prompt": "alone"}])
    with pytest.raises(
        ChatDataError, match=r"no usable conversation: all 2 rows .* \(1 no_assistant_turn, 1 not_json\)"
    ):
        chat_data(root, [{"type": "jsonl", "path": "chats.jsonl"}])
    assert rows(root) == before and json.loads((root / "metrics/chat.json").read_text())["conversations_out"] == 1
    assert "| read | 2 |" in (root / "reports/chat/report.md").read_text()


# --- plays ---------------------------------------------------------------------------------------------------

PLAY = """THE TRAGEDY OF TESTS

PERSONS REPRESENTED.

Alpha, a questioner.
Beta, who answers.

ACT I.

Scene I. A room.

[Enter Alpha and Beta.]

Alp.
Who goes there?

Beta.
A friend, [Aside.] or so
  I say.

Alp.
What news?

Beta.
None yet, but

[Aside.]

more soon.

[Enter Gamma.]

Gam.
I come late.

Alp.
Too late.

Gam.
Then I go.

Scene II. A hall.

Alp.
One.

Beta.
Two.

Gam.
Three.

Beta.
Four.

Gam.
Five.

ACT II.

Scene I. A garden.

ALPHA
Six.

BETA
Seven.

ALPHA
Eight.

GAMMA
Nine.

ALPHA
Ten.
"""


@pytest.fixture
def raw_plays(tmp_path: Path) -> Path:
    """A project whose data/raw (as the ingest stage writes it) holds a small play and a poem."""
    root = tmp_path / "p"
    texts = root / "data/raw/corpus/texts"
    texts.mkdir(parents=True)
    (texts / "play_gut.txt").write_text(PLAY)
    (texts / "sonnets_gut.txt").write_text("SONNETS\n\nI.\nFrom fairest creatures we desire increase,\n")
    (texts / "play_gut_f.txt").write_text("Actus Primus.\n\n  Alp. Who goes there?\n  Beta. A friend.\n")
    files = [{"file": f"corpus/texts/{p.name}", "source": "local:corpus"} for p in sorted(texts.iterdir())]
    (root / "data/raw/manifest.json").write_text(json.dumps({"files": files, "skipped": []}))
    return root


def test_plays_give_two_speaker_exchanges(raw_plays: Path):
    metrics = chat_data(raw_plays, [{"type": "plays", "include": ["*/texts/*_gut.txt"]}])
    got = [[m["content"] for m in conv] for conv in messages(raw_plays)]
    assert sorted(got) == sorted(
        [
            # directions go, a speech goes on after one; an entrance ends the exchange
            ["Who goes there?", "A friend, or so\nI say.", "What news?", "None yet, but\nmore soon."],
            ["I come late.", "Too late."],  # the scene ends before anyone answers "Then I go."
            ["One.", "Two."],  # a third speaker ends an exchange ...
            ["Three.", "Four."],  # ... and starts the next
            ["Six.", "Seven."],  # speakers in capitals; an odd exchange's last speech starts the next one
            ["Eight.", "Nine."],
        ]
    )
    assert all([m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2) for conv in messages(raw_plays))
    assert metrics["sources"]["plays"]["conversations_in"] == 6
    assert "plays:corpus/texts/play_gut.txt#L14" in {row["source"] for _, row in rows(raw_plays).values()}


def test_plays_without_dialogue_or_data_fail_in_one_line(raw_plays: Path, tmp_path: Path):
    with pytest.raises(ChatDataError, match=r"no dialogue in the 2 file\(s\) matching include"):
        chat_data(raw_plays, [{"type": "plays", "include": ["*/texts/sonnets_gut.txt", "*_f.txt"]}])
    with pytest.raises(ChatDataError, match=r"manifest.json not found: .* run it first \(dvc repro ingest\)"):
        chat_data(tmp_path / "empty", [{"type": "plays"}])


# --- the split and the cap -----------------------------------------------------------------------------------


def test_the_split_is_stable_whatever_else_the_sources_hold(tmp_path: Path):
    convs = [chat(f"question {i}", f"answer {i}") for i in range(400)]
    write_jsonl(tmp_path / "a/chats.jsonl", convs)
    chat_data(tmp_path / "a", [{"type": "jsonl", "path": "chats.jsonl"}], val=0.2, test=0.1)
    first = {i: split for i, (split, _) in rows(tmp_path / "a").items()}
    counts = {s: list(first.values()).count(s) for s in ("train", "val", "test")}
    assert 40 <= counts["val"] <= 120 and 15 <= counts["test"] <= 70, counts  # about 80 and 40
    # the same conversations among others, in another order, in another source: each in the same split
    others = [chat(f"other {i}", "x") for i in range(100)]
    mixed = convs[::2] + others
    random.Random(0).shuffle(mixed)
    write_jsonl(tmp_path / "b/more/chats.jsonl", mixed)
    chat_data(tmp_path / "b", [{"type": "jsonl", "path": "more"}], val=0.2, test=0.1)
    second = {i: split for i, (split, _) in rows(tmp_path / "b").items()}
    common = set(first) & set(second)
    assert len(common) == 200 and all(first[i] == second[i] for i in common)


def test_max_conversations_keeps_the_same_sample_in_any_order(tmp_path: Path):
    convs = [chat(f"q{i}", f"a{i}") for i in range(60)]
    write_jsonl(tmp_path / "a/c.jsonl", convs)
    write_jsonl(tmp_path / "b/c.jsonl", convs[::-1])
    source = {"type": "jsonl", "path": "c.jsonl", "max_conversations": 20}
    metrics = chat_data(tmp_path / "a", [source])
    chat_data(tmp_path / "b", [source])
    assert metrics["conversations_out"] == 20 and metrics["capped"] == 40 and metrics["dropped"] == {}
    assert rows(tmp_path / "a").keys() == rows(tmp_path / "b").keys()
    splits = {split for split, _ in rows(tmp_path / "a").values()}
    assert "train" in splits  # the sample is not drawn from one end of the split's hash range


# --- errors: one line, never a traceback ---------------------------------------------------------------------


def test_cli_with_a_bad_source_fails_in_one_line(tmp_path: Path):
    params = {
        "data": {"sources": [{"type": "local", "path": "corpus"}]},
        "finetune": {"sources": [{"type": "jsonl", "path": "missing.jsonl"}]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_module("pipelines.chat_data", tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "chat_data: error: jsonl source 'missing.jsonl' does not exist. Fix finetune.sources[].path (a .jsonl file "
        "or a folder; relative paths are from the project root)."
    ]


def test_no_finetune_section_and_misspelled_keys_are_named(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"sources": [{"type": "local", "path": "c"}]}}))
    with pytest.raises(ChatDataError, match=r"has no `finetune` section: declare finetune.sources"):
        summarize(load_params(tmp_path / "params.yaml"), PROJECT.under(tmp_path))
    raw = {"data": {"sources": [{"type": "local", "path": "c"}]}, "finetune": {"sources": [{**CHITCHAT_SOURCE}]}}
    raw["finetune"]["sources"][0]["max_conversation"] = 5
    with pytest.raises(ParamsError, match=r"unknown key 'finetune.sources.0.max_conversation' \(did you mean"):
        parse_params(raw)


def test_hf_source_offline_fails_with_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the hub is unreachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(
        ChatDataError, match=r"hf:org/chats\[train\]: the Hugging Face hub cannot be reached .* offline, use a jsonl"
    ):
        chat_data(tmp_path, [{"type": "hf", "name": "org/chats", "max_rows": 10}])
