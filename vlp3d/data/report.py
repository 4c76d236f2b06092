"""Report text: section selection, whitespace normalisation, sentence splitting."""

from __future__ import annotations

import math
import re

_ABBREVIATIONS = (
    "approx", "dr", "mr", "mrs", "ms", "prof", "vs", "e.g", "i.e", "etc", "fig", "no", "nos",
    "cm", "mm", "max", "min", "ca", "cf", "st", "sr", "jr", "incl", "resp", "lt", "rt", "bil",
)
_ABBREV_RE = re.compile(r"\b(" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")\.", re.IGNORECASE)
_DECIMAL_RE = re.compile(r"(\d)\.(\d)")
_LIST_ITEM_RE = re.compile(r"(?:^|\s)(?:\d{1,2}[.)]|[-*\u2022])\s+")
_BOUNDARY_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])")
_PLACEHOLDER = "\x00"


def select_sections(row: dict, sections: tuple[str, ...]) -> str:
    """Join the configured report columns of a row; missing or NaN sections are skipped.

    A generic manifest has one `report` column and none of the sections: that column is used (also
    when the section columns exist but are empty for this row, as in a corpus that mixes both kinds).
    """
    if "report" in row and not any(_present(row.get(name)) for name in sections):
        sections = ("report",)
    parts = []
    for name in sections:
        value = row.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        text = str(value).strip()
        if text:
            parts.append(text)
    return "\n".join(parts)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and bool(str(value).strip())


def normalise_whitespace(text: str) -> str:
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def split_sentences(text: str) -> list[str]:
    """Sentences of a report; survives 'approx. 1.5 cm', 'Dr.', numbered lists and line breaks."""
    sentences: list[str] = []
    for line in re.split(r"\n+", text):
        line = normalise_whitespace(line)
        if not line:
            continue
        protected = _DECIMAL_RE.sub(lambda m: f"{m.group(1)}{_PLACEHOLDER}{m.group(2)}", line)
        protected = _ABBREV_RE.sub(lambda m: m.group(1) + _PLACEHOLDER, protected)
        for item in _LIST_ITEM_RE.split(protected):
            for sentence in _BOUNDARY_RE.split(item):
                sentence = sentence.replace(_PLACEHOLDER, ".").strip()
                if sentence and re.search(r"\w", sentence):
                    sentences.append(sentence)
    return sentences


def report_text(row: dict, sections: tuple[str, ...]) -> tuple[str, list[str]]:
    """(normalised report text, sentences) for a corpus row."""
    sentences = split_sentences(select_sections(row, sections))
    return " ".join(sentences), sentences
