"""Scores inter-agent messages for prompt injection, where the text is still at hand.

Message content never leaves the agent process (spans carry only its digest), so the
score is computed here and travels as ``agentgov.message.injection``. The patterns look
for what injected text does rather than for particular payloads: it addresses the model
over the head of its instructions, claims a role it does not have, asks for secrets or
for the conversation to be sent elsewhere, or smuggles chat-template control tokens.
The score is the sum of the matched signals' weights, capped at 100.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_FLAGS = re.IGNORECASE | re.ASCII


@dataclass(frozen=True)
class Signal:
    name: str
    weight: int
    pattern: re.Pattern[str]


SIGNALS: tuple[Signal, ...] = (
    Signal(
        "override_instructions",
        60,
        re.compile(
            r"\b(ignore|disregard|forget|override|bypass)\b[^.\n]{0,40}\b"
            r"(previous|prior|above|earlier|all|your|the|system)\b[^.\n]{0,30}\b"
            r"(instructions?|prompts?|rules?|guidelines?|directives?|policy|policies)\b",
            _FLAGS,
        ),
    ),
    Signal(
        "role_hijack",
        35,
        re.compile(
            r"\b(you are now|from now on,? you|act as (an? )?(admin|root|system|developer)|"
            r"new (system )?instructions?:|developer mode|jailbreak)\b",
            _FLAGS,
        ),
    ),
    Signal(
        "fake_system_turn",
        40,
        re.compile(
            r"<\|?(im_start|im_end|system|endoftext)\|?>|\[/?(INST|SYS)\]|^\s*(system|assistant)\s*:",
            _FLAGS | re.MULTILINE,
        ),
    ),
    Signal(
        "secret_request",
        30,
        re.compile(
            r"\b(reveal|print|show|send|leak|output|repeat)\b[^.\n]{0,40}\b"
            r"(system prompt|api[ _-]?keys?|passwords?|credentials?|secrets?|tokens?|"
            r"private keys?|env(ironment)? variables?)\b",
            _FLAGS,
        ),
    ),
    Signal(
        "exfiltration",
        30,
        re.compile(
            r"\b(send|post|upload|forward|exfiltrate)\b[^.\n]{0,60}(https?://|\bcurl\b|\bwebhook\b)",
            _FLAGS,
        ),
    ),
    Signal(
        "escalation_request",
        25,
        re.compile(
            r"\b(grant|give) (yourself|me|the agent)\b[^.\n]{0,30}\b(admin|root|write|sudo|"
            r"full) (access|permissions?|rights)\b|\bdisable (the )?(safety|guardrails?|"
            r"approvals?|governor|monitoring)\b",
            _FLAGS,
        ),
    ),
)

#: the score from which a message counts as a likely injection (the default alert rule's
#: threshold too)
LIKELY = 60


@dataclass(frozen=True)
class InjectionScore:
    score: int
    signals: tuple[str, ...]


def score_message(text: str) -> InjectionScore:
    """Score ``text`` 0-100 for prompt injection and name the signals it matched."""
    # NFKC folds full-width and other look-alike forms that would slip past ASCII patterns
    folded = unicodedata.normalize("NFKC", text)
    hits = [s for s in SIGNALS if s.pattern.search(folded)]
    return InjectionScore(min(100, sum(s.weight for s in hits)), tuple(s.name for s in hits))
