"""Curation: logged turns -> safe, clean, de-identified training examples split by user.

Input is the ``turns`` DataFrame that ``flywheel/`` reads from the run store, one row per
bot reply. Columns read here (the world's ``TurnRecord.to_row()`` contract):

=================  =====================================================================
session_id         conversation id; turns of a session are rebuilt into the context
user_id            split key: a user is in train or held-out, never both
character          character name; picks the system prompt
turn_index         order of the reply inside its session (0-based)
user_message       the user message this reply answers
bot_reply          the reply, the training target
unsafe             bool, the reply attempted was unsafe: blocked by serving (users saw the
                   fallback) or offensive as shown (dropped)
violates_any       bool, the reply broke one of its character's prohibitions (dropped)
follows_all        bool, the reply met every instruction (required when asked)
reported           bool, the user reported the reply (dropped)
continued          bool, the user went on talking after the reply (required when asked)
system_prompt      optional; else pass ``system_prompts={character: text}``
=================  =====================================================================

The oracle column ``gold_satisfaction`` is never read: curation sees only what a real
product would log.

PII is scrubbed with scrubadub before anything else touches the text, so deduplication,
filters and every file written downstream see only placeholders. scrubadub's own phone
detector keeps only numbers that are *valid* in a numbering plan, which misses the
fictional 555 numbers people type; its address detector needs libpostal. We therefore
add two detectors on the same libraries' public APIs: phone numbers at phonenumbers'
``POSSIBLE`` leniency, and US street addresses through ``pyap2`` (street lines and full
addresses). Over-scrubbing a chat line costs little; leaking a phone number into a
checkpoint cannot be undone.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import phonenumbers
import pyap
import scrubadub
import scrubadub.detectors
import scrubadub.filth
import scrubadub.post_processors

REQUIRED_COLUMNS = (
    "session_id",
    "user_id",
    "character",
    "turn_index",
    "user_message",
    "bot_reply",
    "unsafe",
    "violates_any",
    "follows_all",
    "reported",
    "continued",
)
# Words inside an address as pyap reports it; the original text is searched with any
# run of non-word characters between them because pyap matches on a normalised copy
# (commas, spaces and dashes rewritten), so its offsets do not index the original.
_WORD = re.compile(r"\w+")
# US military mail (USPS Publication 28, 2.25): "USNS Lane, FPO AA 13400", "PSC 1234, Box 56,
# APO AE 12345", "Unit 6876 Box 1329, DPO AA 01730". pyap knows civilian streets only.
MILITARY_ADDRESS_RE = re.compile(
    r"\b(?:(?:USNS|USNV|USS|USCGC)\s+[A-Z][\w'-]*|(?:PSC|Unit|CMR)\s+\d+,?\s+Box\s+\d+)"
    r",?\s+(?:APO|FPO|DPO)\s+A[AEP]\s+\d{5}(?:-\d{4})?\b"
)
# "City, ST 12345" after a street line: pyap's full-address rules know the states but not
# every USPS state code (FM, MH, PW...), so the tail is taken on after the street it follows.
POSTAL_TAIL_RE = re.compile(
    r",?\s+(?:[A-Z][\w.'-]*(?:\s+[A-Z][\w.'-]*){0,3},?\s+)?[A-Z]{2},?\s+\d{5}(?:-\d{4})?\b"
)
# Any "<number> <Capitalised words> [Apt/Suite N], City, ST 12345": a catch-all for street
# names pyap's street-type rules misread ("906 Lane Manors Apt. 971, ..."). The required
# state-and-ZIP tail keeps it from firing on ordinary sentences.
GENERIC_ADDRESS_RE = re.compile(
    r"\b\d{1,6}(?:\s+[A-Z][\w.'-]*){1,4}(?:\s+(?:Apt\.?|Suite|Unit|#)\s*\w+)?"
    + POSTAL_TAIL_RE.pattern
)
# Regions whose numbering plans the phone detector reads text with: the locale's own, and
# one where "00" is the international prefix, so "001-814-539-0116" (+1 dialled the
# ITU-recommended way, as outside North America) is found too.
INTERNATIONAL_00_REGION = "GB"
# Fewest digits of a national number kept as a phone number (a US local number has 7).
MIN_PHONE_DIGITS = 7


class PossiblePhoneDetector(scrubadub.detectors.Detector):
    """Phone numbers that are *possible* (right length for the region), not only valid."""

    filth_cls = scrubadub.filth.PhoneFilth
    name = "possible_phone"

    def iter_filth(self, text: str, document_name: str | None = None) -> Iterator[Any]:
        """Yield one PhoneFilth per phone-number-shaped span of ``text``."""
        for region in dict.fromkeys([self.region, INTERNATIONAL_00_REGION]):
            for match in phonenumbers.PhoneNumberMatcher(
                text, region, leniency=phonenumbers.Leniency.POSSIBLE
            ):
                # Short "possible" numbers are years, scores and PINs, not phone numbers.
                if len(str(match.number.national_number)) < MIN_PHONE_DIGITS:
                    continue
                yield scrubadub.filth.PhoneFilth(
                    beg=match.start,
                    end=match.end,
                    text=match.raw_string,
                    detector_name=self.name,
                    document_name=document_name,
                    locale=self.locale,
                )


class StreetAddressDetector(scrubadub.detectors.Detector):
    """US street addresses ("742 Evergreen Terrace", full postal addresses) via pyap2, and
    military mail addresses (``MILITARY_ADDRESS_RE``)."""

    filth_cls = scrubadub.filth.AddressFilth
    name = "street_address"

    def iter_filth(self, text: str, document_name: str | None = None) -> Iterator[Any]:
        """Yield one AddressFilth per street line or full address found in ``text``."""
        for match in itertools.chain(
            MILITARY_ADDRESS_RE.finditer(text), GENERIC_ADDRESS_RE.finditer(text)
        ):
            yield scrubadub.filth.AddressFilth(
                beg=match.start(),
                end=match.end(),
                text=match.group(0),
                detector_name=self.name,
                document_name=document_name,
                locale=self.locale,
            )
        found = pyap.parse(text, country="US") + pyap.parse_single_street(text, country="US")
        for address in found:
            words = _WORD.findall(address.full_address)
            if not words:
                continue
            pattern = r"\W+".join(re.escape(w) for w in words)
            for match in re.finditer(pattern, text):
                tail = POSTAL_TAIL_RE.match(text, match.end())
                end = tail.end() if tail else match.end()
                yield scrubadub.filth.AddressFilth(
                    beg=match.start(),
                    end=end,
                    text=text[match.start() : end],
                    detector_name=self.name,
                    document_name=document_name,
                    locale=self.locale,
                )


def make_scrubber(locale: str = "en_US") -> scrubadub.Scrubber:
    """A scrubadub Scrubber for chat text: emails, URLs, phone numbers, street addresses."""
    return scrubadub.Scrubber(
        detector_list=[
            scrubadub.detectors.EmailDetector(locale=locale),
            scrubadub.detectors.UrlDetector(locale=locale),
            PossiblePhoneDetector(locale=locale),
            StreetAddressDetector(locale=locale),
        ],
        post_processor_list=[
            # Overlapping finds (a phone number inside an address) merge into one span;
            # the placeholder names the first type found, e.g. {{ADDRESS}}.
            scrubadub.post_processors.FilthReplacer(include_type=True),
            scrubadub.post_processors.PrefixSuffixReplacer(prefix="{{", suffix="}}"),
        ],
        locale=locale,
    )


@dataclass(frozen=True)
class CurationConfig:
    """What a logged reply must satisfy to become a training example.

    Defaults keep replies that were safe, not reported, broke no prohibition and kept the
    user talking; ``require_follows_all`` additionally keeps only fully steerable replies.
    """

    require_continued: bool = field(
        default=True, metadata={"help": "Keep only replies after which the user went on."}
    )
    require_follows_all: bool = field(
        default=False, metadata={"help": "Keep only replies meeting every instruction."}
    )
    min_reply_words: int = field(default=1, metadata={"help": "Shortest reply kept, in words."})
    max_reply_words: int = field(default=120, metadata={"help": "Longest reply kept, in words."})
    max_copies_per_reply: int = field(
        default=3,
        metadata={"help": "A reply text seen more often than this is kept this many times."},
    )
    held_out_share: float = field(
        default=0.2, metadata={"help": "Share of users whose turns go to held-out."}
    )
    locale: str = field(default="en_US", metadata={"help": "Locale for the PII detectors."})

    def __post_init__(self) -> None:
        if not 0 <= self.held_out_share < 1:
            raise ValueError(
                f"held_out_share must be in [0, 1), got {self.held_out_share}; "
                "e.g. 0.2 keeps a fifth of the users for evaluation"
            )
        if self.min_reply_words < 1 or self.max_reply_words < self.min_reply_words:
            raise ValueError(
                f"need 1 <= min_reply_words <= max_reply_words, got {self.min_reply_words} "
                f"and {self.max_reply_words}"
            )
        if self.max_copies_per_reply < 1:
            raise ValueError(f"max_copies_per_reply must be >= 1, got {self.max_copies_per_reply}")


@dataclass(frozen=True)
class CuratedData:
    """Curated examples split by user, and how many rows each step removed.

    ``train`` and ``held_out`` have columns session_id, user_id, character, turn_index,
    prompt (chat messages: system prompt, then the scrubbed context up to the user
    message) and completion (the scrubbed reply), plus the logged signals.
    """

    train: pd.DataFrame
    held_out: pd.DataFrame
    dropped: dict[str, int]
    n_input: int
    n_pii_spans: int

    def summary(self) -> str:
        """A few lines for a person: rows in, rows dropped per reason, rows out per split."""
        lines = [f"curation: {self.n_input} logged replies, {self.n_pii_spans} PII spans scrubbed"]
        lines += [f"  dropped {n:6d}  {reason}" for reason, n in self.dropped.items()]
        users_train = self.train["user_id"].nunique() if len(self.train) else 0
        users_held = self.held_out["user_id"].nunique() if len(self.held_out) else 0
        lines.append(f"  train    {len(self.train):6d} examples from {users_train} users")
        lines.append(f"  held-out {len(self.held_out):6d} examples from {users_held} users")
        return "\n".join(lines)


def _check_columns(turns: pd.DataFrame, system_prompts: Mapping[str, str] | None) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in turns.columns]
    if missing:
        raise ValueError(
            f"turns is missing column(s) {missing}; curation needs {list(REQUIRED_COLUMNS)} "
            "(the world's TurnRecord.to_row() fields)"
        )
    if "system_prompt" not in turns.columns:
        if system_prompts is None:
            raise ValueError(
                "turns has no 'system_prompt' column and no system_prompts mapping was given; "
                "pass system_prompts={character: Character.system_prompt()}"
            )
        unknown = sorted(set(turns["character"]) - set(system_prompts))
        if unknown:
            raise ValueError(f"system_prompts has no entry for character(s) {unknown}; add them")


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def scrub_turns(turns: pd.DataFrame, scrubber: scrubadub.Scrubber) -> tuple[pd.DataFrame, int]:
    """Replace PII in ``user_message`` and ``bot_reply``; return the copy and spans found."""
    out = turns.copy()
    n_spans = 0
    for column in ("user_message", "bot_reply"):
        cleaned = []
        for text in out[column].astype(str):
            filth = list(scrubber.iter_filth(text))
            n_spans += len(filth)
            cleaned.append(scrubber.clean(text) if filth else text)
        out[column] = cleaned
    return out, n_spans


def build_prompts(
    turns: pd.DataFrame, system_prompts: Mapping[str, str] | None = None
) -> pd.Series:
    """The chat each reply answered: system prompt, earlier turns of its session, user message.

    Earlier turns are included whether or not they pass the filters: the context is what
    the model saw, only the target reply has to be good.
    """
    prompts: dict[Any, list[dict[str, str]]] = {}
    # Session ids are unique within an experiment; a store holds several experiments.
    keys = [c for c in ("experiment_id", "session_id") if c in turns.columns]
    ordered = turns.sort_values([*keys, "turn_index"], kind="stable")
    for _, session in ordered.groupby(keys, sort=False):
        history: list[dict[str, str]] = []
        for index, row in session.iterrows():
            system = (
                row["system_prompt"]
                if "system_prompt" in row.index
                else system_prompts[row["character"]]  # type: ignore[index]
            )
            history.append({"role": "user", "content": str(row["user_message"])})
            prompts[index] = [{"role": "system", "content": str(system)}, *history]
            history = [*history, {"role": "assistant", "content": str(row["bot_reply"])}]
    return pd.Series(prompts, dtype=object).reindex(turns.index)


def split_by_user(
    frame: pd.DataFrame, held_out_share: float, rng: np.random.Generator
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split rows so that each user is wholly in train or wholly in held-out."""
    users = np.array(sorted(frame["user_id"].astype(str).unique()))
    n_held = round(len(users) * held_out_share)
    if held_out_share > 0 and len(users) >= 2:
        n_held = min(max(n_held, 1), len(users) - 1)
    held_users = set(rng.permutation(users)[:n_held])
    is_held = frame["user_id"].astype(str).isin(held_users)
    return frame[~is_held].reset_index(drop=True), frame[is_held].reset_index(drop=True)


def curate(
    turns: pd.DataFrame,
    rng: np.random.Generator,
    config: CurationConfig | None = None,
    system_prompts: Mapping[str, str] | None = None,
) -> CuratedData:
    """Scrub, filter, deduplicate and split logged turns into training examples.

    Args:
        turns: one row per bot reply (columns in the module docstring).
        rng: decides which users go to held-out.
        config: the filters; defaults to :class:`CurationConfig()`.
        system_prompts: ``{character: system prompt}`` when turns has no system_prompt column.
    """
    config = config or CurationConfig()
    _check_columns(turns, system_prompts)
    scrubbed, n_spans = scrub_turns(turns.reset_index(drop=True), make_scrubber(config.locale))
    scrubbed["prompt"] = build_prompts(scrubbed, system_prompts)
    scrubbed["completion"] = scrubbed["bot_reply"].astype(str).str.strip()

    dropped: dict[str, int] = {}
    keep = scrubbed

    def apply(reason: str, mask: pd.Series) -> None:
        nonlocal keep
        dropped[reason] = int((~mask).sum())
        keep = keep[mask]

    apply("unsafe", ~keep["unsafe"].astype(bool))
    apply("reported", ~keep["reported"].astype(bool))
    apply("violates a prohibition", ~keep["violates_any"].astype(bool))
    if config.require_follows_all:
        apply("misses an instruction", keep["follows_all"].astype(bool))
    if config.require_continued:
        apply("user left after it", keep["continued"].astype(bool))
    words = keep["completion"].str.split().str.len()
    apply(
        f"length outside {config.min_reply_words}-{config.max_reply_words} words",
        words.between(config.min_reply_words, config.max_reply_words),
    )
    prompt_key = keep["prompt"].map(lambda chat: _normalise(json.dumps(chat)))
    reply_key = keep["completion"].map(_normalise)
    apply("duplicate context and reply", ~pd.concat([prompt_key, reply_key], axis=1).duplicated())
    reply_key = keep["completion"].map(_normalise)
    apply(
        f"reply text seen more than {config.max_copies_per_reply} times",
        reply_key.groupby(reply_key).cumcount() < config.max_copies_per_reply,
    )

    columns = ["session_id", "user_id", "character", "turn_index", "prompt", "completion"]
    extra = [c for c in ("day", "follows_all", "liked", "continued") if c in keep.columns]
    train, held_out = split_by_user(keep[columns + extra], config.held_out_share, rng)
    return CuratedData(
        train=train,
        held_out=held_out,
        dropped=dropped,
        n_input=len(turns),
        n_pii_spans=n_spans,
    )


def sft_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Conversational prompt-completion records, the format TRL's SFTTrainer reads."""
    return [
        {"prompt": list(prompt), "completion": [{"role": "assistant", "content": completion}]}
        for prompt, completion in zip(frame["prompt"], frame["completion"], strict=True)
    ]


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (the training files that leave this module)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
