"""PII redaction for support conversations: e-mail addresses, phone numbers, payment card numbers and known names
become typed placeholders ([EMAIL], [PHONE], [CARD], [NAME]), counted per kind.

The patterns lean towards leaving text alone where a false positive would damage the data a model learns from:
a card number must pass the Luhn check, and a phone number must look like one (a leading +, a leading 0, an area
code in parentheses, or separated digit groups), so order numbers, ISO dates and amounts survive. Names are not
guessed: only the names a ticket itself records (its requester and agent columns) are replaced.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

PLACEHOLDERS = {"EMAIL": "[EMAIL]", "PHONE": "[PHONE]", "CARD": "[CARD]", "NAME": "[NAME]"}

EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# 13-19 digits written as one run, as groups of four (Visa, Mastercard: 4-4-4-4..7) or as Amex's 4-6-5.
CARD = re.compile(r"(?<![\d-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,7}|\d{4}([ -])\d{6}\2\d{4,5})(?![\d-])")
# A run of digits and the separators phone numbers use; whether it is a phone number is decided in code.
PHONE = re.compile(r"(?<![\w+#/.,:-])(?:\+ ?)?\(?\d[\d ().-]{5,22}\d(?![\w/:-]|[.,]\d)")
DATE = re.compile(r"\d{4}([./-])\d{1,2}\1\d{1,2}|\d{1,2}([./-])\d{1,2}\2\d{2,4}")
IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")
# The words before an order, invoice or ticket number: a number after them is a reference, not a phone.
REFERENCE_BEFORE = re.compile(
    r"(?i)(?:\b(?:order|invoice|ticket|case|ref|reference|tracking|account|sku|serial|"
    r"model|receipt)\b(?:\s*(?:no\.?|number|nr\.?|id))?|#)\s*[:#]?\s*#?\s*$"
)


def redact(text: str, names: Iterable[str] = ()) -> tuple[str, Counter[str]]:
    """`text` with every recognised piece of PII replaced by its placeholder, and the count per kind.

    E-mail addresses go first, so a name inside one is not half-replaced; cards before phones, so a card
    number is never taken for a phone number."""
    counts: Counter[str] = Counter()
    text, counts["EMAIL"] = EMAIL.subn(PLACEHOLDERS["EMAIL"], text)
    text, counts["CARD"] = replace_matching(CARD, text, is_card_number, PLACEHOLDERS["CARD"])
    text, counts["PHONE"] = replace_matching(PHONE, text, is_phone_number, PLACEHOLDERS["PHONE"])
    text, counts["NAME"] = redact_names(text, names)
    return text, +counts  # without the zero counts


def replace_matching(pattern: re.Pattern, text: str, accept, placeholder: str) -> tuple[str, int]:
    """Replace the matches of `pattern` that `accept(match, text)` confirms; (new text, replacements)."""
    count = 0

    def replace(match: re.Match) -> str:
        nonlocal count
        if not accept(match, text):
            return match.group(0)
        count += 1
        return placeholder

    return pattern.sub(replace, text), count


def passes_luhn(digits: str) -> bool:
    """The check digit every payment card number carries: random long numbers fail it nine times in ten."""
    total = 0
    for index, character in enumerate(reversed(digits)):
        value = int(character)
        if index % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def is_card_number(match: re.Match, text: str) -> bool:
    digits = re.sub(r"\D", "", match.group(0))
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and passes_luhn(digits)


def is_phone_number(match: re.Match, text: str) -> bool:
    """Whether a run of digits and separators is a phone number rather than a date, an amount or a reference."""
    candidate = match.group(0).strip()
    digits = re.sub(r"\D", "", candidate)
    if DATE.fullmatch(candidate) or IPV4.fullmatch(candidate):
        return False
    if REFERENCE_BEFORE.search(text[max(0, match.start() - 30) : match.start()]):
        return False
    if candidate.startswith("+"):
        return 8 <= len(digits) <= 15
    groups = [group for group in re.split(r"[ ().-]+", candidate) if group]
    separated = len(groups) >= 3 or "(" in candidate
    if candidate.startswith("00") and len(groups) >= 2:  # 0044 20 7946 0958: the international prefix written out
        return 8 <= len(digits) <= 15
    if not 7 <= len(digits) <= 12:
        return False
    if "(" not in candidate and len(groups[0]) <= 3 and all(len(group) == 3 for group in groups[1:]):
        return candidate.startswith("0") and len(groups) > 1  # 1 234 567 is an amount; 020 123 456 a number
    return separated or candidate.startswith("0")


def redact_names(text: str, names: Iterable[str]) -> tuple[str, int]:
    """Replace the given people's full names (any case) and their first and last names (capitalised, so that
    a name that is also a word, like Will or Grace, is kept where it is used as the word)."""
    count = 0
    for variant, any_case in name_variants(names):
        tokens = variant.split()
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, tokens)) + r"(?!\w)", re.IGNORECASE)

        def replace(match: re.Match, any_case: bool = any_case) -> str:
            nonlocal count
            if not any_case and not match.group(0)[0].isupper():
                return match.group(0)
            count += 1
            return PLACEHOLDERS["NAME"]

        text = pattern.sub(replace, text)
    return text, count


def name_variants(names: Iterable[str]) -> list[tuple[str, bool]]:
    """(variant, match any case) for each name: the full name, then its first and last words; longest first, so
    'Maria Lopez' is replaced whole before 'Maria' alone."""
    variants: dict[str, bool] = {}
    for name in names:
        words = [
            word
            for word in str(name).split()
            if len(word) >= 2 and not any(character.isdigit() or character == "@" for character in word)
        ]
        if len(words) >= 2:
            variants[" ".join(words).lower()] = True
        for word in {words[0], words[-1]} if words else ():
            variants.setdefault(word.lower(), False)
    return sorted(variants.items(), key=lambda item: -len(item[0]))
