"""Commands from MQTT (DESIGN.md, "MQTT"): validated with pydantic, bounded, always answered.

Every command is parsed here; a payload that is not UTF-8 JSON, has unknown keys or out-of-range values gives
a ``CommandError`` whose message goes back on the command's state topic. Nothing in this module acts.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploy.untrusted_json import parse_untrusted_json

MAX_COMMAND_BYTES = 64 * 1024


class CommandError(ValueError):
    """A command that is refused; the message says why (one line)."""


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    request_id: str | None = Field(default=None, max_length=128)


class ThresholdSet(_Command):
    """``P/<cam>/threshold/set``: a threshold in normalised units (0 < t < 1), or null for the configured one."""

    threshold: float | None = Field(gt=0, lt=1)


class ModelSet(_Command):
    """``P/model/set`` (remote updates, issue 7)."""

    url: str = Field(max_length=2048)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    version: str = Field(max_length=128)


class ModelRollback(_Command):
    """``P/model/rollback``."""


C = TypeVar("C", bound=_Command)


def request_id_of(payload: bytes) -> str | None:
    """The request_id of a payload, even of one that is otherwise invalid (so that a refusal can name it)."""
    try:
        data = parse_untrusted_json(payload)
    except ValueError:  # UnicodeDecodeError is one
        return None
    rid = data.get("request_id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else None


def parse_command(model: type[C], payload: bytes) -> C:
    """Payload bytes -> the command. CommandError naming the first problem."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command is {len(payload)} bytes; at most {MAX_COMMAND_BYTES}")
    try:
        data: Any = parse_untrusted_json(payload)
    except UnicodeDecodeError:
        raise CommandError("command is not UTF-8 text") from None
    except ValueError as exc:
        raise CommandError(f"command is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CommandError("command must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "command"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise CommandError(f"{where}: {msg}") from None
