"""The support tables of docs/http-api.md must say what the installed engines declare."""

from __future__ import annotations

from pathlib import Path

import pytest

from lllms_core.plugins import get_plugin_manager

DOC = Path(__file__).parent.parent / "docs" / "http-api.md"

# (section heading, text that starts the row's first cell) -> capability name; the engines
# are the columns the table's header names
ROWS = {
    ("chat/completions", "`image_url` content parts"): "vision",
    ("chat/completions", "`temperature`"): "temperature",
    ("chat/completions", "`top_p`"): "top_p",
    ("chat/completions", "`top_k`"): "top_k",
    ("chat/completions", "`min_p`"): "min_p",
    ("chat/completions", "`repeat_penalty`"): "repeat_penalty",
    ("chat/completions", "`repeat_last_n`"): "penalty_window",
    ("chat/completions", "`frequency_penalty`"): "frequency_penalty",
    ("chat/completions", "`logit_bias`"): "logit_bias",
    ("chat/completions", "`seed`"): "seed",
    ("chat/completions", "`grammar`"): "grammar",
    ("chat/completions", "`response_format`"): "json_schema",
    ("chat/completions", "`tools`"): "tools",
    ("chat/completions", "`logprobs`"): "logprobs",
    ("chat/completions", "`n`"): "n",
    ("chat/completions", "`reasoning_effort`"): "reasoning_budget",
    ("/v1/completions", "`prompt`: token ids"): "token_prompt",
    ("/v1/completions", "`suffix`"): "suffix",
    ("/v1/completions", "`echo`"): "echo",
    ("/v1/completions", "`logprobs`"): "logprobs",
    ("embeddings", "`input`: token ids"): "token_input",
    ("embeddings", "`pooling`"): "pooling",
    ("embeddings", "`input`: images"): "image_embeddings",
    ("audio/transcriptions", "`temperature`"): "temperature",
    ("audio/transcriptions", "`timestamp_granularities[]`"): "word_timestamps",
    ("audio/transcriptions", "`vad_filter`"): "vad_filter",
    ("audio/transcriptions", "`/v1/audio/translations`"): "translate",
    ("audio/speech", "`instructions`"): "instructions",
}


def table_rows():
    """(section, header cells, row cells) of each table row under a ``###`` heading."""
    section, header = "", None
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            section, header = line, None
        elif line.startswith("| ") and section:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                yield section, header, cells
        elif not line.startswith("|"):
            header = None


def documented():
    found = {}
    for section, header, cells in table_rows():
        for (where, start), capability in ROWS.items():
            if where in section and cells[0].startswith(start) and len(cells) == len(header):
                found[(where, start)] = dict(zip(header[1:], cells[1:]))
    return found


@pytest.mark.parametrize("row", sorted(ROWS), ids=lambda row: f"{row[0]} {row[1]}")
def test_each_engine_column_matches_what_the_engine_declares(row):
    engines = get_plugin_manager().engines
    cells = documented().get(row)
    assert cells is not None, f"docs/http-api.md has no row {row[1]} under {row[0]}"
    capability = ROWS[row]
    for engine, cell in cells.items():
        if engine not in engines:
            continue
        supported = capability in engines[engine].capabilities
        assert cell.startswith("✅" if supported else "❌"), (
            f"{row[1]} ({row[0]}): the {engine} column says {cell!r}, "
            f"but the engine {'declares' if supported else 'does not declare'} {capability!r}"
        )
