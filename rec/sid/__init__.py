"""Semantic IDs: text embeddings -> residual quantisation -> unique code tuples -> SID tokens and a prefix trie."""

from rec.sid.codes import (
    SID_BEGIN,
    SID_END,
    SidParseError,
    code_token,
    find_sids,
    parse_sid,
    render_sid,
    sid_special_tokens,
)
from rec.sid.quantize import QUANTIZERS, disambiguate, sid_report
from rec.sid.trie import SidTrie

__all__ = [
    "QUANTIZERS",
    "SID_BEGIN",
    "SID_END",
    "SidParseError",
    "SidTrie",
    "code_token",
    "disambiguate",
    "find_sids",
    "parse_sid",
    "render_sid",
    "sid_report",
    "sid_special_tokens",
]
