"""The daemon's configuration: a YAML file (DESIGN.md, "Daemon configuration") with EDGE_* environment overrides.

``load_config(path)`` returns a validated ``DaemonConfig`` or raises ``ConfigError`` whose ``problems`` list
holds one line per problem, each naming the key and, where the YAML has it, the line number. Environment
variables override the file key by key: ``EDGE_MQTT__HOST=broker.plant`` sets ``mqtt.host``; a list such as
``cameras`` is replaced whole by a JSON value (``EDGE_CAMERAS='[{"id": "cam0", "source": 0}]'``).
Secrets never live in the file: the MQTT password comes from ``mqtt.password_file`` or ``EDGE_MQTT__PASSWORD``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

CAMERA_ID = r"^[A-Za-z0-9_-]{1,64}$"
DEVICE_ID = r"^[A-Za-z0-9_-]{1,64}$"
TOPIC_PREFIX = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one human-readable line per problem."""

    def __init__(self, path: Path | None, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Section):
    ca: Path = Field(description="CA certificate (PEM) that signed the broker's certificate")
    cert: Path | None = Field(default=None, description="client certificate (PEM), for brokers that require one")
    key: Path | None = Field(default=None, description="the client certificate's private key (PEM)")
    insecure: bool = Field(default=False, description="skip the broker host name check (testing only)")

    @model_validator(mode="after")
    def _cert_and_key(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls.cert and tls.key go together: give both or neither")
        return self


class MqttConfig(_Section):
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str = Field(default="inspect", pattern=TOPIC_PREFIX)
    client_id: str | None = Field(default=None, max_length=128, description="default: edge-inspect-<device_id>")
    keepalive: int = Field(default=30, ge=5, le=3600, description="seconds")
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    tls: TlsConfig | None = None
    username: str | None = None
    password_file: Path | None = Field(default=None, description="a file holding the password (first line)")
    password: SecretStr | None = Field(default=None, description="set through EDGE_MQTT__PASSWORD, never the file")


class CameraConfig(_Section):
    id: str = Field(pattern=CAMERA_ID, description="goes into MQTT topics: letters, digits, _ and - only")
    source: int | str = Field(description="index, /dev/videoN, rtsp://, http(s)://, gst:<pipeline> or a file path")
    loop: bool = Field(default=False, description="files only: start again at the end")
    realtime: bool = Field(default=False, description="files only: play at the file's frame rate")
    fps_cap: float | None = Field(default=None, gt=0, le=1000, description="score at most this many frames/s")
    expected_fps: float | None = Field(default=None, gt=0, le=1000, description="below half of it: degraded")
    roi: tuple[int, int, int, int] | None = Field(default=None, description="x, y, w, h in frame pixels")
    threshold: float | None = Field(default=None, gt=0, lt=1, description="override, normalised units")
    open_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="FFmpeg/GStreamer sources: give up one open after this long, s"
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="give up waiting for a frame after this long, s (V4L2: the first camera's, process-wide)",
    )

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < 0 or v[2] < 1 or v[3] < 1):
            raise ValueError("roi is x, y, w, h with x, y >= 0 and w, h >= 1")
        return v

    @field_validator("source", mode="before")  # before pydantic turns `true` into camera 1
    @classmethod
    def _source(cls, v: int | str) -> int | str:
        from edge_daemon.capture.sources import parse_source

        parse_source(v)  # ValueError with the reason
        return v


class EventsConfig(_Section):
    open_frames: int = Field(default=2, ge=1, le=1000)
    close_frames: int = Field(default=3, ge=1, le=1000)
    max_seconds: float = Field(default=60.0, gt=0)
    min_gap_s: float = Field(default=0.0, ge=0)
    update_interval_s: float = Field(default=1.0, gt=0)


class CropConfig(_Section):
    padding: float = Field(default=0.15, ge=0, le=2)
    min_side: int = Field(default=96, ge=0, le=8192, description="least crop width/height, px (context)")
    max_side: int = Field(default=512, ge=16, le=8192)
    jpeg_quality: int = Field(default=90, ge=1, le=100)


class SpoolConfig(_Section):
    path: Path = Path("/var/lib/edge-inspect/spool.db")
    max_mb: float = Field(default=512, gt=0)
    synchronous: Literal["FULL", "NORMAL"] = Field(
        default="FULL", description="FULL survives power loss (one fsync per message); NORMAL only a crash"
    )


class HttpConfig(_Section):
    bind: str | None = Field(
        default="127.0.0.1:9108", description="host:port for /healthz and /metrics (port 0: any free one); null = off"
    )

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str | None) -> str | None:
        if v is None:
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"bind must be host:port, got {v!r}")
        return v


class UpdatesConfig(_Section):
    """Remote model updates (P/model/set): download limits, engine build limit, probation rules."""

    max_bundle_mb: float = Field(default=1024, gt=0, description="refuse bigger bundles")
    stall_timeout_s: float = Field(default=60, gt=0, description="a download with no byte for this long fails")
    download_timeout_s: float = Field(default=3600, gt=0)
    build_timeout_s: float = Field(default=3600, gt=0, description="TensorRT engine build time limit")
    probation_s: float = Field(default=300, ge=0, description="watch a new model this long before it is active")
    probation_min_frames: int = Field(default=50, ge=1, description="frames before the anomaly rate is judged")
    max_anomaly_rate: float = Field(default=0.25, gt=0, le=1, description="more anomalous frames: roll back")
    max_latency_ms: float | None = Field(default=None, gt=0, description="p99 capture-to-outbox budget, ms")
    keep: int = Field(default=3, ge=1, le=20, description="previous bundles kept for model/rollback")


class DaemonConfig(BaseSettings):
    """Everything the daemon reads at start (and again on SIGHUP). Units: seconds, pixels, megabytes."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", env_nested_delimiter="__", extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID)
    bundle: Path = Field(description="bundle directory or .tar")
    trusted_keys: list[Path] = Field(default_factory=list, description="Ed25519 public keys; empty: refuse all")
    allow_unsigned: bool = Field(default=False, description="testing only: run a bundle without a signature")
    state_dir: Path = Field(default=Path("/var/lib/edge-inspect"), description="engine cache, unpacked bundles")
    backend: Literal["auto", "tensorrt", "onnxruntime"] = "auto"
    tensorrt_precision: Literal["fp16", "fp32"] = Field(default="fp16", description="engines built on the device")
    engine_build_timeout_s: float = Field(default=3600, gt=0, description="give up a TensorRT build after this")
    workers: int = Field(
        default=1, ge=1, le=16, description="scoring threads, one per core to use; each owns a share of the cameras"
    )
    max_batch: int = Field(default=8, ge=1, le=64, description="frames of several cameras scored in one call")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    cameras: list[CameraConfig] = Field(min_length=1)
    events: EventsConfig = Field(default_factory=EventsConfig)
    crop: CropConfig = Field(default_factory=CropConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    stats_interval_s: float = Field(default=10.0, ge=1)
    http: HttpConfig = Field(default_factory=HttpConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    allow_downgrade: bool = Field(default=False, description="accept a pushed bundle older than the active one")
    drain_timeout_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description=(
            "SIGTERM: at most this long to flush; above 20 s raise the unit's TimeoutStopSec (30 s) with it, or "
            "systemd kills the drain (nothing is lost: the spool keeps what was not sent)"
        ),
    )

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, v: list[CameraConfig]) -> list[CameraConfig]:
        seen: set[str] = set()
        for cam in v:
            if cam.id in seen:
                raise ValueError(f"camera id {cam.id!r} is used twice")
            seen.add(cam.id)
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file comes in as init kwargs; the environment overrides it, key by key.
        return (env_settings, init_settings)

    def mqtt_password(self) -> str | None:
        """The password from EDGE_MQTT__PASSWORD, else the first line of mqtt.password_file, else None."""
        if self.mqtt.password is not None:
            return self.mqtt.password.get_secret_value()
        if self.mqtt.password_file is not None:
            lines = self.mqtt.password_file.read_text(encoding="utf-8").splitlines()
            if not lines or not lines[0]:
                raise ValueError(f"{self.mqtt.password_file} is empty")
            return lines[0]
        return None

    def digest(self) -> str:
        """sha256 (first 16 hex digits) of the effective config, secrets left out: goes into P/info."""
        data = self.model_dump(mode="json", exclude={"mqtt": {"password"}})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def camera(self, camera_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(camera_id)


# ------------------------------------------------------------------------------------------ loading


_Node = tuple[tuple[str, ...], Any, "int | None"]  # key path, yaml node, its key's line


def _yaml_nodes(text: str) -> Iterator[_Node]:
    """Every node of the YAML ``text`` in document order with its key path (('cameras', '0', 'source'), ...) and,
    for a mapping's value, its key's 1-based line (else None). Nothing when the text is not valid YAML."""
    import yaml

    def walk(node: Any, path: tuple[str, ...], key_line: int | None) -> Iterator[_Node]:
        yield path, node, key_line
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                yield from walk(value, (*path, str(key.value)), key.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                yield from walk(item, (*path, str(i)), None)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return
    if root is not None:
        yield from walk(root, (), None)


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path (('cameras', '0', 'source'), ...) to its 1-based line in the YAML text."""
    lines: dict[tuple[str, ...], int] = {}
    for path, node, key_line in _yaml_nodes(text):
        if key_line is not None:
            lines[path] = key_line
        else:
            lines.setdefault(path, node.start_mark.line + 1)
    return lines


def _duplicate_keys(text: str) -> list[str]:
    """One line per key that appears twice in the same YAML mapping: YAML keeps only the last one, so a second
    ``cameras:`` list silently dropped the first list's cameras. (Keys inside a repeated key are not listed again.)"""
    first: dict[tuple[str, ...], int] = {}
    repeated: list[tuple[str, ...]] = []
    problems: list[str] = []
    for path, _, line in _yaml_nodes(text):
        if line is None or path[-1] == "<<":
            continue
        if path not in first:
            first[path] = line
        elif not any(path[: len(r)] == r for r in repeated):
            repeated.append(path)
            problems.append(
                f"line {line}: {'.'.join(path)} is given again (first on line {first[path]}); YAML would keep only "
                "this one: merge the two"
            )
    return problems


def _describe(errors: list[Any], lines: dict[tuple[str, ...], int], source: str) -> list[str]:
    """One line per validation error, with its YAML line, or the EDGE_* variable it came from."""
    env = _env_config_vars()
    out = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in lines and n > 0:
                line = lines[loc[:n]]
                break
        key = ".".join(loc) or "<top level>"
        where = f"line {line}: " if line else ""
        lowered = tuple(p.lower() for p in loc)
        var = next((v for v, path in env.items() if lowered[: len(path)] == path), None)
        inside = None  # a variable for a part of this key (EDGE_CAMERAS__0__THRESHOLD for the list cameras)
        if var is None and lowered:
            inside = next((v for v, path in env.items() if path[: len(lowered)] == lowered), None)
        if var is not None or inside is not None:
            where = f"environment variable {var or inside}: "
        msg = err["msg"].removeprefix("Value error, ")
        if inside is not None and err["type"] == "list_type":
            whole = "EDGE_" + "__".join(loc).upper()
            msg = f"a list cannot be changed item by item; give the whole list as JSON in {whole}"
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{source}{where}{key}: {msg}")
    return out


def parse_config(text: str, path: Path | None = None, *, base: Path | None = None) -> DaemonConfig:
    """YAML text -> DaemonConfig (environment overrides applied). ConfigError with one line per problem.

    ``base``: the folder relative paths in the config are relative to (the config file's, ``load_config``); the
    files the config names for the broker (password, TLS certificates) are checked after that resolution.
    """
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(path, [f"{where}not valid YAML: {problem}"]) from None
    duplicates = _duplicate_keys(text)
    if duplicates:
        raise ConfigError(path, duplicates)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            path, [f"the file must hold a mapping of keys (device_id, bundle, cameras, ...), got {type(data).__name__}"]
        )
    try:
        config = DaemonConfig(**data)
    except ValidationError as exc:
        raise ConfigError(path, _describe(exc.errors(), _yaml_lines(text), "")) from None
    except SettingsError as exc:  # an EDGE_* variable for a list or a section that is not JSON
        raise ConfigError(path, [_describe_env_error(exc)]) from None
    if base is not None:
        config = _resolve_paths(config, base)
    problems = [
        f"environment variable {var} names no config key (keys are EDGE_<KEY>, and a section's keys "
        f"EDGE_<SECTION>__<KEY>, e.g. EDGE_MQTT__HOST)"
        for var in _unknown_env_vars()
    ]
    if config.mqtt.password_file is not None and config.mqtt.password is None:
        try:
            config.mqtt_password()
        except (OSError, ValueError) as exc:
            problems.append(f"mqtt.password_file: cannot read a password from {config.mqtt.password_file}: {exc}")
    tls = config.mqtt.tls
    for name, file in [("ca", tls.ca), ("cert", tls.cert), ("key", tls.key)] if tls is not None else []:
        if file is None:
            continue
        try:
            with open(file, "rb") as f:
                f.read(1)
        except OSError as exc:
            problems.append(f"mqtt.tls.{name}: cannot read {file}: {exc.strerror or exc}")
    if problems:
        raise ConfigError(path, problems)
    return config


def load_config(path: Path) -> DaemonConfig:
    """Read and validate the YAML config at ``path``; relative paths in it are relative to the file's folder."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(path, [f"the file is larger than {MAX_CONFIG_BYTES} bytes: not a config"])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, ["no such file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read it: {exc}"]) from None
    return parse_config(text, path, base=path.parent)


def _describe_env_error(exc: SettingsError) -> str:
    field = re.search(r'field "(\w+)"', str(exc))
    var = f"EDGE_{field.group(1).upper()}" if field else "an EDGE_* variable"
    return (
        f"environment variable {var} is not valid JSON ({exc.__cause__ or exc}): lists and sections are given as JSON "
        """(EDGE_TRUSTED_KEYS='["/etc/edge-inspect/keys/a.pub"]', EDGE_MQTT='{"host": "broker"}'), or a section's """
        "keys one at a time (EDGE_MQTT__HOST=broker)"
    )


def _resolve_paths(config: DaemonConfig, base: Path) -> DaemonConfig:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (base / p)

    config.bundle = fix(config.bundle)
    config.trusted_keys = [fix(k) for k in config.trusted_keys]
    config.state_dir = fix(config.state_dir)
    config.spool.path = fix(config.spool.path)
    from edge_daemon.capture.sources import parse_source

    for cam in config.cameras:
        spec = parse_source(cam.source)
        if spec.kind == "file":  # the path, so that file:///abs/x.mp4 stays /abs/x.mp4
            cam.source = str(fix(Path(str(spec.target))))
    if config.mqtt.password_file is not None:
        config.mqtt.password_file = fix(config.mqtt.password_file)
    if config.mqtt.tls is not None:
        config.mqtt.tls.ca = fix(config.mqtt.tls.ca)
        if config.mqtt.tls.cert is not None:
            config.mqtt.tls.cert = fix(config.mqtt.tls.cert)
        if config.mqtt.tls.key is not None:
            config.mqtt.tls.key = fix(config.mqtt.tls.key)
    return config


ENV_PREFIX = "EDGE_"
OTHER_ENV_PREFIX = "EDGE_INSPECT_"  # the project's variables that are not config keys (the trainer's cache, tests)


def _env_config_vars() -> dict[str, tuple[str, ...]]:
    """EDGE_* variable -> the key path it sets (EDGE_MQTT__HOST -> ("mqtt", "host")); names are case-insensitive."""
    return {
        k: tuple(k[len(ENV_PREFIX) :].lower().split("__"))
        for k in os.environ
        if k.upper().startswith(ENV_PREFIX) and not k.upper().startswith(OTHER_ENV_PREFIX)
    }


def env_overrides() -> list[str]:
    """The EDGE_* variables in this environment that set config keys (names only, values may be secrets): shown by
    check-config. A variable naming no key is a config problem (``parse_config``), not an override."""
    return sorted(k for k, path in _env_config_vars().items() if path[0] in DaemonConfig.model_fields)


def _unknown_env_vars() -> list[str]:
    """EDGE_* variables that name no config key: pydantic-settings ignores them, so a typo (EDGE_MQTT_HOST for
    EDGE_MQTT__HOST) would silently leave the file's value in force."""
    return sorted(k for k, path in _env_config_vars().items() if path[0] not in DaemonConfig.model_fields)


def writable_folder_problem(folder: Path, *, create: bool = True) -> str | None:
    """None when files can be written in ``folder``, else why not (one line). The daemon keeps its state (updates,
    unpacked bundles, engines) and spool there: better refused at start with this reason than a traceback halfway.

    ``create``: make the folder (the daemon's start); without it (doctor) the nearest existing folder on its path is
    probed instead, so that a check creates nothing. The probe writes and deletes one temporary file.
    """
    import tempfile

    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder
        else:
            probe = next(p for p in (folder, *folder.parents) if p.exists())
            if not probe.is_dir():
                return f"{folder} cannot be made: {probe} is not a folder"
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".edge-write-check-"):
            pass
    except OSError as exc:
        return f"{folder} cannot be written: {exc.strerror or exc}"
    return None
