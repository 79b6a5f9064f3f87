"""SFT data pipeline: read files, detect and convert formats, render chat templates with exact
label masks, tokenize with an explicit truncation policy, batch or pack, and check it all first.
"""

from alignkit.data.batching import (
    PackedExample,
    additive_mask,
    block_causal_mask,
    collate,
    collate_packed,
    length_grouped_order,
    pack_examples,
)
from alignkit.data.formats import (
    FORMAT_COLUMNS,
    FORMATS,
    SFT_FORMATS,
    apply_column_map,
    detect_format,
    to_messages,
    validate_messages,
)
from alignkit.data.io import LocatedRecords, read_located, read_records
from alignkit.data.preflight import LengthStats, PreflightReport, preflight_sft, render_report
from alignkit.data.templates import (
    NAMED_TEMPLATES,
    Rendered,
    render_conversation,
    render_text,
    resolve_template,
)
from alignkit.data.tokenize import (
    IGNORE_INDEX,
    Encoded,
    Fitted,
    SFTData,
    TokenizedExample,
    TokenStats,
    encode_rendered,
    fit_to_length,
    load_sft_data,
    tokenize_sft,
)

__all__ = [
    "FORMATS",
    "FORMAT_COLUMNS",
    "IGNORE_INDEX",
    "NAMED_TEMPLATES",
    "SFT_FORMATS",
    "Encoded",
    "Fitted",
    "LengthStats",
    "LocatedRecords",
    "PackedExample",
    "PreflightReport",
    "Rendered",
    "SFTData",
    "TokenStats",
    "TokenizedExample",
    "additive_mask",
    "apply_column_map",
    "block_causal_mask",
    "collate",
    "collate_packed",
    "detect_format",
    "encode_rendered",
    "fit_to_length",
    "length_grouped_order",
    "load_sft_data",
    "pack_examples",
    "preflight_sft",
    "read_located",
    "read_records",
    "render_conversation",
    "render_report",
    "render_text",
    "resolve_template",
    "to_messages",
    "tokenize_sft",
    "validate_messages",
]
