"""Near duplicates (pipelines/clean/dedup.py): sketches of word shingles, exact Jaccard, and clusters that keep their
first document."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash

from pipelines.clean import dedup
from tests.helpers.texts import FOLIO, MILTON, MODERN


def sketches(*texts: str) -> list[dedup.Sketch]:
    return [dedup.sketch([t], shingle_words=3, num_perm=128) for t in texts]


def test_modern_and_archaic_spelling_are_near_duplicates_unrelated_texts_are_not() -> None:
    s_modern, s_folio, s_milton = sketches(MODERN, FOLIO, MILTON)
    assert 0.2 <= dedup.jaccard(s_modern.shingles, s_folio.shingles) < 0.9
    assert dedup.jaccard(s_modern.shingles, s_milton.shingles) < 0.05
    assert dedup.near_duplicates([s_modern, s_milton, s_folio], 0.2, 128) == {
        2: (0, round(dedup.jaccard(s_modern.shingles, s_folio.shingles), 4))
    }
    assert dedup.near_duplicates([s_milton, s_modern], 0.2, 128) == {}


def test_near_duplicate_clusters_keep_the_first_document() -> None:
    edited = MODERN.replace("king", "queen").replace("night", "day")
    result = dedup.near_duplicates(sketches(MILTON, FOLIO, MODERN, edited), 0.2, 128)
    assert set(result) == {2, 3} and all(kept == 1 for kept, _ in result.values())


def test_shingles_do_not_depend_on_how_the_text_is_chunked() -> None:
    words = MODERN.split(" ")
    pieces = [" ".join(words[:7]) + " ", " ".join(words[7:30]) + " ", " ".join(words[30:])]
    assert (dedup.sketch(pieces, 3, 128).shingles == dedup.sketch([MODERN], 3, 128).shingles).all()


def test_jaccard_is_exact() -> None:
    import numpy as np

    a, b = np.array([1, 2, 3, 4], dtype=np.uint32), np.array([3, 4, 5], dtype=np.uint32)
    assert dedup.jaccard(a, b) == dedup.jaccard(b, a) == 2 / 5
    assert dedup.jaccard(a, a) == 1.0 and dedup.jaccard(a, a[:0]) == 0.0


def test_documents_too_short_to_shingle_are_never_near_duplicates() -> None:
    assert dedup.near_duplicates(sketches("", "", "...", "..."), 0.2, 128) == {}


@pytest.mark.parametrize("size", [0, 1, 700, dedup._BATCH + 5])
def test_minhash_equals_datasketchs_own_update(size: int) -> None:
    """The whole-array update gives the hash values MinHash.update_batch gives, batch boundary included."""
    shingles = np.random.default_rng(size).integers(0, 2**32, size, dtype=np.uint64).astype(np.uint32)
    reference = MinHash(num_perm=64, seed=dedup.SEED, hashfunc=int)
    reference.update_batch(shingles.tolist())
    assert np.array_equal(dedup.minhash(shingles, 64).hashvalues, reference.hashvalues)


@pytest.mark.parametrize("size", [0, 1, 2, 1000])
def test_sorted_unique_is_numpys_unique(size: int) -> None:
    values = np.random.default_rng(size).integers(0, 50, size).astype(np.uint32)
    assert np.array_equal(dedup.sorted_unique(values), np.unique(values))
    assert dedup.sorted_unique(values).dtype == values.dtype
