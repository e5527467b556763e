"""SID strings: `<|sid_begin|><s_a_12><s_b_200><s_c_7><s_d_0><|sid_end|>`, one token per level.

>>> render_sid([12, 200, 7, 0])
'<|sid_begin|><s_a_12><s_b_200><s_c_7><s_d_0><|sid_end|>'
>>> parse_sid('<|sid_begin|><s_a_12><s_b_200><s_c_7><s_d_0><|sid_end|>')
(12, 200, 7, 0)
>>> find_sids('pick <|sid_begin|><s_a_1><s_b_2><|sid_end|> then <|sid_begin|><s_a_3><s_b_4><|sid_end|>')
[(1, 2), (3, 4)]
"""

from __future__ import annotations

import re
import string

SID_BEGIN = "<|sid_begin|>"
SID_END = "<|sid_end|>"
LEVEL_LETTERS = string.ascii_lowercase
_CODE_RE = re.compile(r"<s_([a-z])_(\d+)>")
_SID_RE = re.compile(re.escape(SID_BEGIN) + r"((?:<s_[a-z]_\d+>)+)" + re.escape(SID_END))


class SidParseError(ValueError):
    """Text is not a well-formed SID."""


def code_token(level: int, code: int) -> str:
    """The token for `code` at `level` (0-based): level 0 -> `<s_a_N>`, level 1 -> `<s_b_N>`, ..."""
    if not 0 <= level < len(LEVEL_LETTERS):
        raise ValueError(f"level must be in [0, {len(LEVEL_LETTERS)}), got {level}")
    if code < 0:
        raise ValueError(f"code must be >= 0, got {code}")
    return f"<s_{LEVEL_LETTERS[level]}_{code}>"


def sid_special_tokens(levels: int, codebook_size: int) -> list[str]:
    """Every SID token a model needs: begin/end markers, then level by level, code by code."""
    return [SID_BEGIN, SID_END] + [code_token(level, code) for level in range(levels) for code in range(codebook_size)]


def render_sid(codes) -> str:
    return SID_BEGIN + "".join(code_token(level, int(code)) for level, code in enumerate(codes)) + SID_END


def _codes_of(body: str, text: str) -> tuple[int, ...]:
    codes = []
    position = 0
    for level, match in enumerate(_CODE_RE.finditer(body)):
        if match.start() != position:
            raise SidParseError(f"unexpected text {body[position:match.start()]!r} in SID {text!r}")
        if match.group(1) != LEVEL_LETTERS[level]:
            raise SidParseError(
                f"SID {text!r}: level {level} token should be <s_{LEVEL_LETTERS[level]}_*>, got {match.group(0)}"
            )
        codes.append(int(match.group(2)))
        position = match.end()
    if position != len(body) or not codes:
        raise SidParseError(f"malformed SID {text!r}")
    return tuple(codes)


def parse_sid(text: str) -> tuple[int, ...]:
    """Codes of one SID string (surrounding whitespace allowed, nothing else)."""
    stripped = text.strip()
    match = _SID_RE.fullmatch(stripped)
    if match is None:
        raise SidParseError(f"not a SID: {text!r} (expected {SID_BEGIN}<s_a_N>...{SID_END})")
    return _codes_of(match.group(1), text)


def find_sids(text: str) -> list[tuple[int, ...]]:
    """Every well-formed SID in `text`, in order; malformed fragments are ignored."""
    found = []
    for match in _SID_RE.finditer(text):
        try:
            found.append(_codes_of(match.group(1), match.group(0)))
        except SidParseError:
            continue
    return found
