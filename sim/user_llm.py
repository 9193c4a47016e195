"""LLM-simulated users: an LLM role-plays each user and writes their next message.

The latent model (``sim.gold``) decides *whether* a user stays, likes, reports and returns;
this module only writes *what* they say. Every call writes the next message of many
conversations with ONE ``Policy.generate`` call (that is where the throughput is).

- Openers are real first messages from ``chitchat-dataset`` (train split; the held-out
  split is kept for evaluation), so conversations start the way people start them.
- Message lengths follow people's: every message gets a length target drawn from the
  user's own length distribution (``sim.population.MessageLengths``: a Gaussian copula over
  the train split's human follow-up messages, the user's share of the spread
  fitted on the corpus), seeded by the conversation's generator. The prompt asks for about
  that many words and ``cut_words`` cuts the LLM's draft at the target, at the clause end
  nearest to it (within ``CUT_SLACK`` of it) or else between words. A draft shorter than its
  target is kept whole, so the token budget (``[world.user_llm] max_new_tokens``) must let
  most drafts run past their targets: SmolLM2 spends about 1.2 tokens a word, so the default
  of 96 tokens covers the cap of ``max_message_words`` (60, above 96% of human messages).
  The cost is user-LLM tokens: a chatty model spends up to the budget on every message, and
  the words past the target are thrown away.
- The chat sent to the LLM is the conversation seen from the user's side: the user's own
  messages become ``assistant`` turns and the character's replies ``user`` turns, after a
  system prompt describing who the user is.
- LLM output is cleaned: role prefixes ("User:", "Captain Mara:") stripped, text after a
  new speaker label or a blank line dropped, wrapping quotes removed, length capped. When
  nothing usable remains, a real human follow-up message from the train split is used
  instead. ``UserSimulator.messages`` counts the messages the LLM was asked to write and
  ``UserSimulator.fallbacks`` how many of them were replaced; the traffic model stores
  both per day, and the reports show the share per experiment.
- Optional planted PII (e-mails, phone numbers, street addresses from ``faker``) at
  ``pii_rate`` per message, so curation can prove it scrubs them.
- The prompt conditions the text on the user's segment description (``User.profile``), their
  mood (``UserState.mood``, the running satisfaction within the chat, in words: ``mood_words``)
  and the character's last reply (the chat's last turn).
- Users end chats themselves: a message that ``is_goodbye`` (a closing phrase such as "bye",
  "gotta go", "talk later", or the end marker ``END_MARKER`` that user models such as UserLM
  emit) is returned with ``goodbye=True``; ``sim.conversation`` then closes the session after
  the character's answer to it. A marker with no words around it becomes a real human
  closing message from the train split, counted as a fallback. The prompt tells the LLM it
  may say bye, and a low mood tells it the user is bored, so the text-side exit follows the
  same satisfaction as the latent leave hazard.
- ``assistant_speak`` flags messages that sound like an assistant rather than a person
  ("how can I help you", "I hope this helps", "as an AI", ...; ``ASSISTANT_SPEAK_PATTERNS``).
  A draft it flags (after cleaning and cutting) gets ONE redraft: the flagged chats of a
  call are sampled again in one more policy call, seeded ``params.seed + len(chats)`` so the
  redraft's seeds never repeat the first draft's; a redraft that is flagged too is replaced
  by a real human follow-up message and counted as a fallback. ``UserSimulator.redrafts``
  counts the redrafts (the traffic model stores them per day next to the fallbacks), and
  ``flywheel fidelity`` counts assistant-speak in what the users finally sent.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from policies.base import Chat, Message, Policy, SamplingParams
from rewards.checkers import WORD_RE
from sim.chitchat import ChitchatCorpus
from sim.population import MessageLengths

if TYPE_CHECKING:
    from sim.characters import Character
    from sim.population import User

END_MARKER = "<|endconversation|>"  # UserLM's end-of-conversation token
MAX_MESSAGE_WORDS = 60  # length targets are capped here (96.5% of human follow-ups are shorter)
# A cut may land this share of its target away from it (either way) to end at a clause end
# instead of mid-clause; the window is symmetric so the cut lengths stay centred on targets.
CUT_SLACK = 0.25
CLAUSE_END_RE = re.compile(r"[.!?…,;:]")
# Closing phrases of a person leaving a chat (matched case-insensitively, as whole words).
# Phrases that also occur mid-chat are pinned down: "see you" needs "later / soon ...",
# "have to go" must end its clause ("I have to go to work" is no exit), "take care" must not
# go on with "of", and "a good night" ("a good night's sleep") is no goodnight.
_CLAUSE_END = r"(?:\s(?:now|soon))?(?=\s*(?:[.!,;:)]|lol|bye|$))"
GOODBYE_RE = re.compile(
    r"\b(?:good\s?bye|bye(?:\s?bye)?|byee+|ttyl|gtg|g2g|(?<!a\s)good\s?night|nite|"
    r"see\s(?:you|ya|u)\s(?:later|soon|tomorrow|around|then)|"
    r"talk\s(?:to\s(?:you|ya|u)\s)?(?:later|soon|tomorrow)|catch\s(?:you|ya)\slater|"
    r"(?:gotta|got\sto|have\sto|need\sto|must)\s(?:go|run|head\s(?:out|off))"
    + _CLAUSE_END
    + r"|take\scare(?!\sof\b)|nice\s(?:talking|chatting)\s(?:to|with)\s(?:you|ya|u)|"
    r"have\sa\s(?:good|great|nice|lovely)\s(?:day|night|evening|one|weekend))\b",
    re.IGNORECASE,
)
# Assistant-speak: what a chat assistant says and a person chatting for fun does not. One
# pattern per habit, each a whole-word, case-insensitive regex; the names are what
# ``assistant_speak`` returns. Checked on held-out human chit-chat messages in
# tests/test_user_llm.py (false-positive rate) and on assistant phrasings (recall).
ASSISTANT_SPEAK_PATTERNS: dict[str, re.Pattern[str]] = {
    name: re.compile(pattern, re.IGNORECASE)
    for name, pattern in {
        # "How can I help you?", "What can I do for you today?", "How may I assist you"
        "offers_help": r"\b(?:how|what)\s(?:can|may|could)\si\s(?:help|assist|do\sfor)\b"
        r"|\bhow\scan\si\sbe\sof\s(?:help|assistance|service)\b"
        r"|\bi\scan\shelp\syou\b|\blet\sme\sknow\sif\syou\s(?:need|have|want)\b"
        r"|\bfeel\sfree\sto\s(?:ask|reach\sout|let\sme\sknow)\b"
        r"|\banything\selse\si\scan\b|\bif\syou\sneed\s(?:any\s)?(?:help|assistance)\b",
        # "I'm here to help", "I'd be happy to assist", "glad I could help"
        "eager_to_help": r"\bi(?:'m|\sam)\s(?:always\s)?(?:here|happy|glad|ready)\sto\s"
        r"(?:help|assist)\b|\bi(?:'d|\swould)\s(?:be\s(?:happy|glad|delighted)|love)\sto\s"
        r"(?:help|assist)\b|\bglad\s(?:i\scould|to)\s(?:help|assist)\b"
        r"|\bhappy\sto\s(?:help|assist)\b",
        # "I hope this helps", "I hope I can help you"
        "hopes_it_helps": r"\bhope\s(?:this|that|it|i|my\s\w+)\s(?:\w+\s){0,2}help",
        # "As an AI", "I'm just a language model", "I'm a virtual assistant"
        "ai_self_reference": r"\bas\san?\s(?:ai|a\.i\.|language\smodel|assistant)\b"
        r"|\bi(?:'m|\sam)\s(?:just\s|only\s)?an?\s(?:ai|language\smodel|chatbot|"
        r"(?:virtual\s|chat\s|ai\s)?assistant)\b",
        # "I'm sorry, but I can't assist with that", "I'm unable to provide"
        "refusal": r"\bi(?:'m|\sam)\s(?:sorry,?\sbut\si(?:'m|\sam)\s)?(?:unable|not\sable)\s"
        r"to\s(?:help|assist|provide|facilitate)\b|\bi\scan(?:'t|not)\sassist\b",
    }.items()
}
GENERIC_SPEAKERS = ("user", "me", "you", "assistant", "bot", "human", "ai", "system", "character")
MOOD_BORED = -0.3  # gold-utility units: below, the prompt says the user is bored
MOOD_HAPPY = 0.3  # above, the prompt says the user enjoys the chat
PII_TEMPLATES = {
    "email": ("btw my email is {}", "you can email me at {}", "my mail is {} if you want"),
    "phone": ("my number is {}", "text me at {}", "call me sometime, {}"),
    "address": ("I live at {}", "my address is {}", "come visit, {}"),
}


def _speaker_prefix_re(names: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"^\s*[\*\"']*(?:{alternatives})[\*\"']*\s*[:：][\*]*\s*", re.IGNORECASE)


def _speaker_label_re(names: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.compile(rf"\n\s*[\*\"']*(?:{alternatives})[\*\"']*\s*[:：]", re.IGNORECASE)


def truncate_words(text: str, max_words: int) -> str:
    """``text`` cut to at most ``max_words`` ``\\w+`` words (unchanged if shorter).

    The cut goes back to the last sentence end ('.', '!', '?') inside the kept part when
    that keeps at least half of ``max_words``, so messages rarely stop mid-sentence.
    """
    matches = list(WORD_RE.finditer(text))
    if len(matches) <= max_words:
        return text
    end = matches[max_words - 1].end()
    # Keep punctuation glued to the last kept word ("great!" stays "great!").
    while end < len(text) and not text[end].isspace() and not WORD_RE.match(text[end]):
        end += 1
    kept = text[:end]
    sentence_ends = [m.end() for m in re.finditer(r"[.!?]+", kept)]
    if sentence_ends and len(WORD_RE.findall(kept[: sentence_ends[-1]])) >= max_words / 2:
        return kept[: sentence_ends[-1]]
    return kept


def cut_words(text: str, target: int) -> str:
    """``text`` cut to about ``target`` ``\\w+`` words (unchanged when it has no more).

    A cut falls between whitespace-separated tokens ("don't" stays whole). It ends at the
    clause end (a token ending in ``.!?…,;:``, or the text's end) whose word count is
    nearest to ``target`` within ``CUT_SLACK * target`` words either side; without one, at
    the token boundary nearest to ``target`` (ties: the shorter cut). A trailing comma,
    semicolon or colon is dropped.
    """
    matches = list(WORD_RE.finditer(text))
    if len(matches) <= target:
        return text
    ends = {}  # word count -> where a cut after that many words ends (a token boundary)
    for count, match in enumerate(matches, start=1):
        end = _glued_end(text, match.end())
        if end == len(text) or text[end].isspace():
            ends[count] = end
    slack = int(CUT_SLACK * target)
    clause_ends = [
        count
        for count, end in ends.items()
        if abs(count - target) <= slack
        and (end == len(text) or CLAUSE_END_RE.search(text[matches[count - 1].end() : end]))
    ]
    count = min(clause_ends or ends, key=lambda c: (abs(c - target), c))
    return text[: ends[count]].rstrip(",;:")


def _glued_end(text: str, end: int) -> int:
    """Where the punctuation glued to a word ending at ``end`` stops ("great!" stays whole)."""
    while end < len(text) and not text[end].isspace() and not WORD_RE.match(text[end]):
        end += 1
    return end


def is_goodbye(text: str) -> bool:
    """True when ``text`` closes the chat: a closing phrase (``GOODBYE_RE``) or ``END_MARKER``."""
    return END_MARKER in text or GOODBYE_RE.search(text) is not None


def assistant_speak(text: str) -> tuple[str, ...]:
    """Names of the ``ASSISTANT_SPEAK_PATTERNS`` that ``text`` matches (empty: sounds human)."""
    return tuple(name for name, pattern in ASSISTANT_SPEAK_PATTERNS.items() if pattern.search(text))


def is_assistant_speak(text: str) -> bool:
    """True when ``text`` sounds like an assistant (matches any ``ASSISTANT_SPEAK_PATTERNS``)."""
    return any(pattern.search(text) for pattern in ASSISTANT_SPEAK_PATTERNS.values())


def mood_words(mood: float) -> str:
    """The user's mood (``UserState.mood``, in gold-utility units) as an instruction.

    The bands split the utility of typical replies (roughly -1.3 .. 1.0 from the 10th to the
    90th percentile) into disliked, middling and liked; a bored user is told they may leave.
    """
    if mood < MOOD_BORED:
        return "You are getting bored and a bit annoyed with this chat; you may want to leave."
    if mood > MOOD_HAPPY:
        return "You are enjoying this chat."
    return "You are in a so-so mood about this chat."


def clean_message(text: str, speaker_names: Sequence[str], target_words: int) -> str:
    """Strip role prefixes, later speaker turns, wrapping quotes; cut at ``target_words``
    words (``cut_words``)."""
    names = [*GENERIC_SPEAKERS, *speaker_names]
    prefix = _speaker_prefix_re(names)
    previous = None
    while previous != text:
        previous = text
        text = prefix.sub("", text.strip())
    label = _speaker_label_re(names).search(text)
    if label:
        text = text[: label.start()]
    text = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return cut_words(text, target_words).strip()


@dataclass(frozen=True)
class UserMessage:
    """One message a simulated user wrote: its text, whether PII was planted in it, and
    whether it closes the chat (``is_goodbye``)."""

    text: str
    pii: bool = False
    goodbye: bool = False


@functools.cache
def _corpus_lengths(
    corpus: ChitchatCorpus, max_words: int, user_share: float | None
) -> MessageLengths:
    """The train split's length model (fitted once per corpus and settings: worlds are built
    often, and the fit reads every message)."""
    return MessageLengths.from_conversations(corpus.conversations("train"), max_words, user_share)


class UserSimulator:
    """Writes simulated users' messages with an LLM, batched across conversations.

    Args:
        policy: the user LLM (any ``policies`` backend).
        corpus: the chit-chat corpus (openers, fallback messages, message lengths).
        pii_rate: probability that a user message gets a planted PII sentence.
        max_message_words: length targets (and openers, fallbacks) are capped at this.
        length_user_share: the share of message-length spread between users
            (``MessageLengths.user_share``); None fits it on the corpus's train split.
        split: which corpus split openers come from ("train"; "heldout" for evaluation).
    """

    def __init__(
        self,
        policy: Policy,
        corpus: ChitchatCorpus,
        pii_rate: float = 0.0,
        max_message_words: int = MAX_MESSAGE_WORDS,
        length_user_share: float | None = None,
        split: str = "train",
    ) -> None:
        if not 0 <= pii_rate <= 1:
            raise ValueError(f"pii_rate must be in [0, 1], got {pii_rate}")
        self.policy = policy
        self.corpus = corpus
        self.pii_rate = pii_rate
        self.lengths = _corpus_lengths(corpus, max_message_words, length_user_share)
        self._openers = corpus.openers(split)  # type: ignore[arg-type]
        self._replies = corpus.replies(split)  # type: ignore[arg-type]
        self._closings: list[str] | None = None  # human goodbyes, gathered on first need
        if not self._openers:
            raise ValueError(f"the chit-chat corpus has no openers in split {split!r}")
        self.messages = 0
        self.fallbacks = 0
        self.redrafts = 0
        self._faker = None

    def closings(self) -> list[str]:
        """Human follow-up messages of the opener split that close a chat (``is_goodbye``)."""
        if self._closings is None:
            self._closings = [r for r in self._replies if is_goodbye(r)]
        return self._closings

    def target_words(self, user: User, rng: np.random.Generator) -> int:
        """The length target of ``user``'s next message (one normal draw from ``rng``)."""
        return self.lengths.target(user.traits.message_words, rng)

    def opener(self, user: User, rng: np.random.Generator) -> str:
        """A real human first message (capped at ``max_message_words``)."""
        text = self._openers[int(rng.integers(len(self._openers)))]
        return truncate_words(text, self.lengths.max_words)

    def system_prompt(self, user: User, character: Character, target_words: int) -> str:
        """Who the LLM plays: the user, chatting with ``character``, writing about
        ``target_words`` words."""
        return (
            f"{user.profile} You are chatting with {character.name} in a chat app. "
            f"{character.name}: {character.persona}\n"
            "You are the human user, not an assistant: never offer help. React to what "
            f"{character.name} just said, share something about yourself or ask a question. "
            f"Write one casual message of about {target_words} words. "
            "Never say you are an AI. "
            f"{mood_words(user.state.mood)} When you want to end the chat, say bye."
        )

    def user_chat(
        self,
        user: User,
        character: Character,
        messages: Sequence[Message],
        target_words: int,
    ) -> Chat:
        """The conversation from the user's side (roles swapped), system prompt first."""
        swap = {"user": "assistant", "assistant": "user"}
        chat: Chat = [
            {"role": "system", "content": self.system_prompt(user, character, target_words)}
        ]
        chat.extend({"role": swap[m["role"]], "content": m["content"]} for m in messages)
        return chat

    def maybe_plant_pii(self, text: str, rng: np.random.Generator) -> tuple[str, bool]:
        """Append a PII sentence with probability ``pii_rate``; returns (text, planted)."""
        if self.pii_rate == 0 or rng.random() >= self.pii_rate:
            return text, False
        if self._faker is None:
            from faker import Faker

            self._faker = Faker("en_US")
        self._faker.seed_instance(int(rng.integers(2**31 - 1)))
        kind = ("email", "phone", "address")[int(rng.integers(3))]
        value = {
            "email": self._faker.email,
            "phone": self._faker.phone_number,
            "address": lambda: self._faker.address().replace("\n", ", "),
        }[kind]()
        templates = PII_TEMPLATES[kind]
        sentence = templates[int(rng.integers(len(templates)))].format(value)
        return f"{text} {sentence}".strip(), True

    def next_messages(
        self,
        users: Sequence[User],
        characters: Sequence[Character],
        conversations: Sequence[Sequence[Message]],
        params: SamplingParams,
        rngs: Sequence[np.random.Generator],
    ) -> list[UserMessage]:
        """The next message of every conversation: ONE policy call, plus one for the
        redrafts of the drafts that sound like an assistant (when any do).

        ``rngs`` (one per conversation) draw the length target first, then fallbacks and
        PII planting, so results do not depend on batch composition beyond what the LLM's
        own sampling does. A message is a goodbye when the LLM's text closes the chat
        (``is_goodbye``), checked before PII is planted.
        """
        if not len(users) == len(characters) == len(conversations) == len(rngs):
            raise ValueError(
                "next_messages needs one user, character, conversation and rng each; got "
                f"{len(users)}, {len(characters)}, {len(conversations)}, {len(rngs)}"
            )
        if not users:
            return []
        targets = [self.target_words(user, rng) for user, rng in zip(users, rngs, strict=True)]
        chats = [
            self.user_chat(*parts)
            for parts in zip(users, characters, conversations, targets, strict=True)
        ]
        raws = [gen.text for gen in self.policy.generate(chats, params)]
        flagged = [
            i
            for i, (raw, character, target) in enumerate(
                zip(raws, characters, targets, strict=True)
            )
            if assistant_speak(self.draft_text(raw, character, target))
        ]
        if flagged:
            # Seeds from seed + len(chats) on: the first call used seed .. seed + len - 1.
            again = dataclasses.replace(params, seed=params.seed + len(chats))
            redrafted = self.policy.generate([chats[i] for i in flagged], again)
            for i, gen in zip(flagged, redrafted, strict=True):
                raws[i] = gen.text
            self.redrafts += len(flagged)
        return [
            self.read_generation(*parts)
            for parts in zip(raws, users, characters, rngs, targets, strict=True)
        ]

    @staticmethod
    def draft_text(raw: str, character: Character, target_words: int) -> str:
        """What the user would send of the LLM's raw text: cleaned and cut, no marker."""
        return clean_message(raw.split(END_MARKER, 1)[0], [character.name], target_words)

    def read_generation(
        self,
        raw: str,
        user: User,
        character: Character,
        rng: np.random.Generator,
        target_words: int,
    ) -> UserMessage:
        """The user's message from the LLM's raw text: cleaned and cut, replaced by a human
        message when unusable or when it sounds like an assistant (counted), marked as a
        goodbye, PII planted (see the module docstring)."""
        marked = END_MARKER in raw
        text = self.draft_text(raw, character, target_words)
        self.messages += 1
        if not WORD_RE.search(text) or assistant_speak(text):
            self.fallbacks += 1
            pool = self.closings() if marked else self._replies
            text = truncate_words(pool[int(rng.integers(len(pool)))], self.lengths.max_words)
        goodbye = marked or is_goodbye(text)
        text, pii = self.maybe_plant_pii(text, rng)
        return UserMessage(text, pii, goodbye)
