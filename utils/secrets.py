"""Keeping tokens and keys out of run folders, saved models and messages.

A run folder is often shared (copied to a colleague, uploaded with a model), so whatever this
trainer writes there, and whatever it prints, passes through `redact` first. Secrets are found
two ways: the values of environment variables whose names say they hold one (HF_TOKEN,
WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...), and strings shaped like well-known tokens
(Hugging Face `hf_...`, GitHub, OpenAI, AWS access key ids), wherever they come from.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

REDACTED = "<redacted>"

# Name parts (split at "_") that mark an environment variable as a secret. Whole parts only:
# TOKENIZERS_PARALLELISM is not a token.
_SECRET_NAME_PARTS = frozenset({"TOKEN", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "KEY", "CREDENTIAL",
                                "CREDENTIALS", "PAT"})
# Shorter values ("1", "true") are settings, and replacing them everywhere would mangle text.
_MIN_SECRET_LENGTH = 8

_TOKEN_SHAPES = re.compile(
    r"\bhf_[A-Za-z0-9]{30,}"                  # Hugging Face user access tokens
    r"|\bapi_org_[A-Za-z0-9]{30,}"            # Hugging Face organisation tokens (old)
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"          # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{30,}"
    r"|\bsk-[A-Za-z0-9_-]{20,}"               # OpenAI-style secret keys
    r"|\bAKIA[0-9A-Z]{16}\b")                 # AWS access key ids

# `token = "..."`, `# api_key = ...` and the like in a TOML file (also commented out): the value
# after a secret-looking key name is a secret whatever its shape.
_SECRET_ASSIGNMENT = re.compile(
    r"(?im)^([ \t]*#?[ \t]*[\w.\"'-]*(?:token|secret|password|passwd|api_?key|access_?key)[\w.\"'-]*[ \t]*=[ \t]*)"
    r"(\S.*?)[ \t]*$")


def _is_secret_name(name: str) -> bool:
    return any(part in _SECRET_NAME_PARTS for part in name.upper().split("_"))


def secret_values(environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """Values of the environment variables whose names mark them as secrets, longest first."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if _is_secret_name(k) and len(v) >= _MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, environ: Optional[Mapping[str, str]] = None) -> tuple[str, int]:
    """`text` with every secret replaced by `<redacted>`, and how many were replaced."""
    count = 0
    for value in secret_values(environ):
        count += text.count(value)
        text = text.replace(value, REDACTED)
    text, n = _TOKEN_SHAPES.subn(REDACTED, text)
    count += n

    def assignment(match: re.Match) -> str:
        nonlocal count
        if REDACTED in match.group(2):
            return match.group(0)
        count += 1
        return match.group(1) + '"' + REDACTED + '"'

    text = _SECRET_ASSIGNMENT.sub(assignment, text)
    return text, count


def redacted(text: str) -> str:
    """`text` with every secret replaced (for messages)."""
    return redact(text)[0]
