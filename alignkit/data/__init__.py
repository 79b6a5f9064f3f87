"""Data pipeline: read files, detect and convert formats, render chat templates with exact
label masks, tokenize with an explicit truncation policy, batch or pack, and check it all first.
SFT rows, preference pairs (plain and prefix-shared batches) and KTO examples.
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
from alignkit.data.kto_preflight import preflight_kto
from alignkit.data.pair_batching import (
    collate_pairs,
    collate_pairs_shared,
    collate_rows,
    prefix_shared_mask,
    sum_by_segment,
)
from alignkit.data.pair_formats import (
    Pair,
    PromptMismatch,
    Unpaired,
    pair_to_unpaired,
    parse_hh,
    split_implicit,
    to_pair,
    to_unpaired,
)
from alignkit.data.preference import (
    KTO_FORMATS,
    PREFERENCE_FORMATS,
    KTOData,
    KTOExample,
    PairExample,
    PairStats,
    PreferenceData,
    fit_prompt,
    load_kto_data,
    load_preference_data,
    tokenize_pair,
)
from alignkit.data.preference_preflight import preflight_preference
from alignkit.data.preflight import LengthStats, PreflightReport, preflight_sft, render_report
from alignkit.data.prompt_preflight import preflight_prompts
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
    "KTO_FORMATS",
    "PREFERENCE_FORMATS",
    "KTOData",
    "KTOExample",
    "Pair",
    "PairExample",
    "PairStats",
    "PreferenceData",
    "PromptMismatch",
    "Unpaired",
    "collate_pairs",
    "collate_pairs_shared",
    "collate_rows",
    "fit_prompt",
    "load_kto_data",
    "load_preference_data",
    "pair_to_unpaired",
    "parse_hh",
    "preflight_preference",
    "prefix_shared_mask",
    "split_implicit",
    "sum_by_segment",
    "to_pair",
    "to_unpaired",
    "tokenize_pair",
    "preflight_for",
    "preflight_prompts",
    "preflight_kto",
]

# The preflight of each data kind of the method table (alignkit.methods), each reading what that
# kind's loader reads: KTO's unpaired kind takes its own rows and preference pairs (split).
PREFLIGHTS = {
    "sft": preflight_sft,
    "pairs": preflight_preference,
    "unpaired": preflight_kto,
    "prompts": preflight_prompts,
}


def preflight_for(kind: str):
    """The preflight function of a method-table data kind."""
    return PREFLIGHTS[kind]
